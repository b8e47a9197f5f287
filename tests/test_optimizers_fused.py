"""The fused-kernel paths (torch's fused Adam/SGD kernels on CPU) against the plain foreach path.

float64, two param groups with weight decay, a transposed (non-contiguous)
parameter that must take the unfused path, gradients left untouched, and
validation of the ``fused`` flag. The native kernels are switched off here
(they take precedence on CPU); tests/test_optimizers_native.py covers them.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import pytest
import torch

import optimizers
from optimizers import _native


@pytest.fixture(autouse=True)
def _torch_fused_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_native.LOADER, "lib", lambda: None)

FUSED = {
    "prodigy": lambda g, **f: optimizers.Prodigy(g, **f),
    "prodigy_coupled": lambda g, **f: optimizers.Prodigy(g, decouple=False, **f),
    "prodigy_bias_correction": lambda g, **f: optimizers.Prodigy(g, use_bias_correction=True, **f),
    "dadapt_adam": lambda g, **f: optimizers.DAdaptAdam(g, decouple=True, **f),
    "dog": lambda g, **f: optimizers.DoG(g, **f),
    "ldog": lambda g, **f: optimizers.LDoG(g, **f),
}


def _run(make: Callable[..., Any], steps: int = 60, transpose: bool = False, nan_at: int = -1,
         **flags: Any) -> list[torch.Tensor]:
    """Train a two-layer net for ``steps`` steps (float64, two groups with weight decay; a NaN in one
    gradient at step ``nan_at``); check that p.grad is never modified; return the parameters."""
    gen = torch.Generator().manual_seed(0)
    w1 = torch.randn(16, 8, generator=gen, dtype=torch.float64) * 0.5
    w1 = torch.nn.Parameter(w1.t().contiguous().t() if transpose else w1)  # same values, column-major
    w2 = torch.nn.Parameter(torch.randn(4, 16, generator=gen, dtype=torch.float64) * 0.5)
    b1 = torch.nn.Parameter(torch.randn(16, generator=gen, dtype=torch.float64) * 0.1)
    b2 = torch.nn.Parameter(torch.zeros(4, dtype=torch.float64))  # starts at zero (Prodigy: no p0 copy)
    x = torch.randn(64, 8, generator=gen, dtype=torch.float64)
    y = torch.randn(64, 4, generator=gen, dtype=torch.float64)
    opt = make([{"params": [w1, w2], "weight_decay": 0.1}, {"params": [b1, b2], "weight_decay": 0.01}], **flags)
    for t in range(steps):
        i = (t * 16) % 64
        opt.zero_grad()
        loss = (((torch.tanh(x[i:i + 16] @ w1.t() + b1) @ w2.t() + b2) - y[i:i + 16]) ** 2).mean()
        loss.backward()
        if t == nan_at:
            w2.grad[1, 3] = math.nan
        grads = [p.grad.clone() for p in (w1, w2, b1, b2)]
        opt.step()
        assert all(bool(((p.grad == g) | (p.grad.isnan() & g.isnan())).all())
                   for p, g in zip((w1, w2, b1, b2), grads)), "p.grad was modified"
    return [p.detach().clone() for p in (w1, w2, b1, b2)]


def _close(a: list[torch.Tensor], b: list[torch.Tensor], rtol: float) -> None:
    for x, y in zip(a, b):
        err = ((x - y).norm() / y.norm()).item()
        assert err <= rtol, f"relative difference {err:.2e} > {rtol:.0e}"


@pytest.mark.parametrize("name", list(FUSED))
def test_fused_matches_unfused_foreach_and_loop(name: str) -> None:
    fused = _run(FUSED[name], fused=True)
    plain = _run(FUSED[name], fused=False)
    loop = _run(FUSED[name], foreach=False)
    _close(fused, plain, 1e-10)
    _close(fused, loop, 1e-10)
    start = _run(FUSED[name], steps=0)
    assert any((a - s).norm() > 1e-3 * s.norm() for a, s in zip(fused, start))


@pytest.mark.parametrize("name", list(FUSED))
def test_non_contiguous_parameter_takes_the_strided_path(name: str) -> None:
    # the fused kernels ignore strides: a column-major weight must still give the same result
    _close(_run(FUSED[name], transpose=True), _run(FUSED[name], foreach=False), 1e-10)


@pytest.mark.parametrize("cls", [optimizers.Prodigy, optimizers.DAdaptAdam, optimizers.DoG, optimizers.LDoG,
                                 optimizers.ScheduleFreeSGD, optimizers.ScheduleFreeAdamW])
def test_fused_flag_is_validated(cls: type) -> None:
    p = torch.nn.Parameter(torch.ones(3))
    with pytest.raises(ValueError, match="fused"):
        cls([p], fused="yes")
    with pytest.raises(ValueError, match="fused"):
        cls([p], fused=True, foreach=False)
    half = torch.nn.Parameter(torch.ones(3, dtype=torch.float16))
    half.grad = torch.ones(3, dtype=torch.float16)
    with pytest.raises(ValueError, match="fused"):
        cls([half], fused=True).step()
    cls([half]).step()  # fused=None: float16 takes the foreach path
