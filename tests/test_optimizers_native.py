"""The native C kernels (optimizers/csrc, via optimizers/_native.py) against the torch paths.

Prodigy, D-Adaptation Adam, DoG, LDoG, Schedule-Free SGD and AdamW in float64, two param groups
with weight decay, 60 steps: native vs torch foreach (and fused) vs loop to 1e-10;
gradients untouched; a non-contiguous parameter falls back; NaN gradients propagate as on the
torch path; results do not depend on the thread count; the build cache recovers from a corrupt
file; without a compiler one warning and the torch path.
"""
from __future__ import annotations

import os
import warnings
from typing import Any

import pytest
import torch

import optimizers
from optimizers import _native
from test_optimizers_fused import FUSED, _close, _run  # the shared float64 training run and comparison

pytestmark = pytest.mark.skipif(_native.LOADER.find_compiler() is None,
                                reason="no C compiler (cc/gcc/clang or $CC): the native kernels cannot be built")

NATIVE = {  # every optimizer with a native kernel, in the settings that select different kernel branches
    **FUSED,
    "dadapt_adam_coupled": lambda g, **f: optimizers.DAdaptAdam(g, **f),
    "schedulefree_sgd": lambda g, **f: optimizers.ScheduleFreeSGD(g, lr=0.5, warmup_steps=5, **f),
    "schedulefree_adamw": lambda g, **f: optimizers.ScheduleFreeAdamW(g, lr=0.05, warmup_steps=5, **f),
    "schedulefree_adamw_no_decay": lambda g, **f: optimizers.ScheduleFreeAdamW(
        [dict(x, weight_decay=0.0) for x in g], lr=0.05, **f),  # the lerp form of the y update
}


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Kernel ids of the native calls made (the native path must really run where tested)."""
    seen: list[int] = []
    real = _native.run

    def spy(kernel: int, *a: Any, **k: Any) -> Any:
        seen.append(kernel)
        return real(kernel, *a, **k)

    monkeypatch.setattr(_native, "run", spy)
    return seen


@pytest.mark.parametrize("name", list(NATIVE))
def test_native_matches_torch_paths(name: str, calls: list[int], monkeypatch: pytest.MonkeyPatch) -> None:
    native = _run(NATIVE[name])
    assert calls, "the native path did not run"
    calls.clear()
    plain = _run(NATIVE[name], fused=False)
    loop = _run(NATIVE[name], foreach=False)
    assert not calls, "fused=False / foreach=False must not use the native kernels"
    _close(native, plain, 1e-10)
    _close(native, loop, 1e-10)
    monkeypatch.setattr(_native.LOADER, "lib", lambda: None)  # torch's fused kernels where they exist
    _close(native, _run(NATIVE[name]), 1e-10)
    start = _run(NATIVE[name], steps=0)
    assert any((a - s).norm() > 1e-3 * s.norm() for a, s in zip(native, start))


@pytest.mark.parametrize("name", list(NATIVE))
def test_non_contiguous_parameter_takes_the_torch_path(name: str) -> None:
    assert not _native.fits([torch.zeros(4, 3).t()])
    assert not _native.fits([torch.zeros(4)], [torch.zeros(5)])  # sizes must agree: raw pointers
    assert _native.fits([torch.zeros(4)], [None])
    _close(_run(NATIVE[name], transpose=True), _run(NATIVE[name], foreach=False), 1e-10)


@pytest.mark.parametrize("name", list(NATIVE))
def test_nan_gradient_propagates_as_on_the_torch_path(name: str) -> None:
    results = []
    for flags in ({}, {"fused": False}):
        try:
            results.append(_run(NATIVE[name], steps=8, nan_at=5, **flags))
        except ValueError as e:  # DoG refuses a NaN gradient norm: it must do so on both paths
            results.append(str(e))
    native, plain = results
    if isinstance(plain, str):
        assert native == plain
        return
    assert any(bool(x.isnan().any()) for x in plain)
    for a, b in zip(native, plain):
        assert torch.equal(a.isnan(), b.isnan())
        torch.testing.assert_close(a, b, rtol=1e-10, atol=0.0, equal_nan=True)


def test_float32_matches_torch_path() -> None:
    shapes = [(300, 70), (70,), (5,)]
    out = []
    for fused in (None, False):
        gen = torch.Generator().manual_seed(1)
        ps = [torch.nn.Parameter(torch.randn(s, generator=torch.Generator().manual_seed(2))) for s in shapes]
        opt = optimizers.Prodigy(ps, weight_decay=0.01, fused=fused)
        for _ in range(10):
            for p in ps:
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
        out.append(ps)
    for a, b in zip(*out):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_results_do_not_depend_on_the_thread_count() -> None:
    gen = torch.Generator().manual_seed(0)
    n = 3_000_017  # several chunks per thread, and a ragged last chunk
    p, g, x0 = (torch.randn(n, generator=gen) for _ in range(3))
    small = torch.randn(1000, generator=gen)
    old = torch.get_num_threads()
    try:
        sums = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            sums.append(_native.run(_native.DOG_STATS, [[p, small], [g, small], [x0, small]], [0.01, 0.0], nred=2))
    finally:
        torch.set_num_threads(old)
    assert torch.equal(sums[0], sums[1]) and torch.equal(sums[0], sums[2])
    def sq(t: torch.Tensor) -> torch.Tensor:
        return (t.double() ** 2).sum()

    ref = torch.stack([torch.stack([sq(p - x0), sq(g + 0.01 * p)]), torch.stack([sq(small - small), sq(1.01 * small)])])
    torch.testing.assert_close(sums[0], ref, rtol=1e-6, atol=1e-6)


def test_corrupt_cached_library_is_rebuilt(tmp_path: Any) -> None:
    first = _native.Loader(cache_dir=str(tmp_path))
    assert first.lib() is not None and first.build_seconds is not None
    (so,) = [f for f in os.listdir(tmp_path) if f.endswith(".so")]
    good = (tmp_path / so).read_bytes()
    for junk in (b"", b"\x7fELF not really a library", good[:len(good) // 2]):
        # a new file in its place (new inode): truncating the file in place would pull the pages from
        # under this process's own mapping of it (SIGBUS at the next touch, e.g. at exit)
        (tmp_path / so).unlink()
        (tmp_path / so).write_bytes(junk)
        again = _native.Loader(cache_dir=str(tmp_path))
        assert again.lib() is not None and again.build_seconds is not None
        assert (tmp_path / so).stat().st_size > 1000
    cached = _native.Loader(cache_dir=str(tmp_path))
    assert cached.lib() is not None and cached.build_seconds is None  # a good cached file is reused
    assert sorted(os.listdir(tmp_path)) == [so, so + ".sha256"]  # no temporaries left behind


def test_no_compiler_warns_once_and_uses_the_torch_path(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    loader = _native.Loader(cache_dir=str(tmp_path))
    monkeypatch.setattr(loader, "find_compiler", lambda: None)
    monkeypatch.setattr(_native, "LOADER", loader)
    with pytest.warns(RuntimeWarning, match="C compiler") as record:
        without = _run(NATIVE["dadapt_adam"], steps=20)
        _run(NATIVE["schedulefree_sgd"], steps=3, fused=True)  # insisting still steps
    assert len([w for w in record if "native" in str(w.message)]) == 1
    assert not os.listdir(tmp_path)
    monkeypatch.undo()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        monkeypatch.setattr(_native.LOADER, "lib", lambda: None)
        assert all(torch.equal(a, b) for a, b in zip(without, _run(NATIVE["dadapt_adam"], steps=20)))
