"""Numerical agreement of the optimizers package with the published reference packages.

Same model, data and settings, float64, two param groups with weight decay,
120 steps: parameters agree to 1e-6 relative. Foreach and loop paths agree
with each other (with buckets small enough to cut tensors into pieces).
"""
from __future__ import annotations

from typing import Any, Callable

import pytest
import torch

import optimizers
import optimizers._common as common

STEPS = 120
RTOL = 1e-6


@pytest.fixture(autouse=True)
def _float64_default():
    # "in float64" includes what the references create with the default dtype
    # (mechanic-pytorch's tuner state is torch.tensor(betas), float32 otherwise)
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(before)


def _problem(seed: int = 0) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.5)
        model[2].bias.zero_()  # a zero-initialised tensor (Prodigy stores its start compactly)
    x = torch.randn(64, 8, generator=gen, dtype=torch.float64)
    y = torch.randn(64, 4, generator=gen, dtype=torch.float64)
    return model, x, y


def _groups(model: torch.nn.Module, wd: tuple[float, float]) -> list[dict[str, Any]]:
    return [{"params": [model[0].weight, model[2].weight], "weight_decay": wd[0]},
            {"params": [model[0].bias, model[2].bias], "weight_decay": wd[1]}]


def _train(make: Callable[[list[dict[str, Any]]], Any], *, wd: tuple[float, float] = (0.1, 0.01),
           steps: int = STEPS, train_mode: bool = False) -> tuple[list[torch.Tensor], Any]:
    model, x, y = _problem()
    opt = make(_groups(model, wd))
    if train_mode:
        opt.train()
    for t in range(steps):
        i = (t * 16) % 64
        opt.zero_grad()
        loss = ((model(x[i:i + 16]) - y[i:i + 16]) ** 2).mean()
        loss.backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()], opt


def _assert_close(ours: list[torch.Tensor], ref: list[torch.Tensor], rtol: float = RTOL) -> None:
    for a, b in zip(ours, ref):
        err = ((a - b).norm() / b.norm().clamp_min(1e-300)).item()
        assert err <= rtol, f"relative difference {err:.2e} > {rtol:.0e}"
    # the trajectories must have gone somewhere, or agreement proves nothing
    start, _, _ = _problem()
    assert any((a - s.detach()).norm() > 1e-3 * s.norm() for a, s in zip(ours, start.parameters()))


def _both_paths(make: Callable[..., Any], monkeypatch: pytest.MonkeyPatch, **kw: Any) -> None:
    """Foreach (cut into 48-element buckets, so tensors are split) and per-tensor loop paths agree."""
    monkeypatch.setattr(common, "CPU_BUCKET_ELEMS", 48)
    a, _ = _train(lambda g: make(g, foreach=True), steps=40, **kw)
    b, _ = _train(lambda g: make(g, foreach=False), steps=40, **kw)
    _assert_close(a, b, rtol=1e-10)


ALL = {
    "nadamw": lambda g, **f: optimizers.NAdamW(g, lr=1e-2, **f),
    "prodigy": lambda g, **f: optimizers.Prodigy(g, **f),
    "prodigy_coupled_b0": lambda g, **f: optimizers.Prodigy(g, decouple=False, betas=(0.0, 0.99), **f),
    "dadapt_adam": lambda g, **f: optimizers.DAdaptAdam(g, **f),
    "dadapt_sgd": lambda g, **f: optimizers.DAdaptSGD(g, momentum=0.5, **f),
    "dog": lambda g, **f: optimizers.DoG(g, **f),
    "ldog": lambda g, **f: optimizers.LDoG(g, **f),
    "mechanic": lambda g, **f: optimizers.Mechanic(g, base_kwargs=dict(lr=1e-2), **f),
    "schedulefree_adamw": lambda g, **f: optimizers.ScheduleFreeAdamW(g, lr=1e-2, **f),
    "schedulefree_sgd": lambda g, **f: optimizers.ScheduleFreeSGD(g, lr=0.05, **f),
}


@pytest.mark.parametrize("name", list(ALL))
def test_accelerator_code_path_matches_loop(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The foreach path taken on GPUs (one bucket, allocated temporaries), run on CPU."""
    monkeypatch.setattr(common, "cpu_layout", lambda t: False)
    a, _ = _train(lambda g: ALL[name](g, foreach=True), steps=40)
    b, _ = _train(lambda g: ALL[name](g, foreach=False), steps=40)
    _assert_close(a, b, rtol=1e-10)


PRODIGY_CASES = [dict(), dict(decouple=False), dict(use_bias_correction=True, safeguard_warmup=True),
                 dict(betas=(0.0, 0.99)), dict(slice_p=3), dict(growth_rate=1.02, d_coef=2.0)]


@pytest.mark.parametrize("kw", PRODIGY_CASES, ids=str)
def test_prodigy_matches_prodigyopt(kw: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    prodigyopt = pytest.importorskip("prodigyopt")
    ref, ref_opt = _train(lambda g: prodigyopt.Prodigy(g, **kw))
    ours, opt = _train(lambda g: optimizers.Prodigy(g, **kw))
    _assert_close(ours, ref)
    assert opt.param_groups[0]["d"] == pytest.approx(ref_opt.param_groups[0]["d"], rel=RTOL)
    _both_paths(lambda g, **f: optimizers.Prodigy(g, **kw, **f), monkeypatch)


@pytest.mark.parametrize("kw", [dict(), dict(decouple=True), dict(use_bias_correction=True),
                                dict(growth_rate=1.05)], ids=str)
def test_dadapt_adam_matches_dadaptation(kw: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    dadaptation = pytest.importorskip("dadaptation")
    ref, ref_opt = _train(lambda g: dadaptation.DAdaptAdam(g, **kw))
    ours, opt = _train(lambda g: optimizers.DAdaptAdam(g, **kw))
    _assert_close(ours, ref)
    assert opt.param_groups[0]["d"] == pytest.approx(ref_opt.param_groups[0]["d"], rel=RTOL)
    _both_paths(lambda g, **f: optimizers.DAdaptAdam(g, **kw, **f), monkeypatch)


@pytest.mark.parametrize("kw", [dict(), dict(momentum=0.9), dict(growth_rate=1.05)], ids=str)
def test_dadapt_sgd_matches_dadaptation(kw: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    dadaptation = pytest.importorskip("dadaptation")
    # the reference applies the first group's weight decay to every group: give both the same
    wd = (0.05, 0.05)
    ref, ref_opt = _train(lambda g: dadaptation.DAdaptSGD(g, **kw), wd=wd)
    ours, opt = _train(lambda g: optimizers.DAdaptSGD(g, **kw), wd=wd)
    _assert_close(ours, ref)
    assert opt.param_groups[0]["d"] == pytest.approx(ref_opt.param_groups[0]["d"], rel=RTOL)
    _both_paths(lambda g, **f: optimizers.DAdaptSGD(g, **kw, **f), monkeypatch, wd=(0.05, 0.01))


@pytest.mark.parametrize("name", ["DoG", "LDoG"])
@pytest.mark.parametrize("kw", [dict(), dict(reps_rel=1e-4), dict(init_eta=1e-3)], ids=str)
def test_dog_matches_dog_optimizer(name: str, kw: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    dog = pytest.importorskip("dog")
    ref, _ = _train(lambda g: getattr(dog, name)(g, **kw))
    ours, _ = _train(lambda g: getattr(optimizers, name)(g, **kw))
    _assert_close(ours, ref)
    _both_paths(lambda g, **f: getattr(optimizers, name)(g, **kw, **f), monkeypatch)


def test_polynomial_decay_averager_matches_dog_optimizer() -> None:
    dog = pytest.importorskip("dog")
    model, x, y = _problem()
    ref = dog.PolynomialDecayAverager(model, gamma=8.0)
    ours = optimizers.PolynomialDecayAverager(model, gamma=8.0)
    loop = optimizers.PolynomialDecayAverager(model, gamma=8.0, foreach=False)
    opt = optimizers.DoG(model.parameters())
    for _ in range(STEPS):
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
        for a in (ref, ours, loop):
            a.step()
    want = list(ref.averaged_model.parameters())
    _assert_close(list(ours.averaged_model.parameters()), want)
    _assert_close(list(loop.averaged_model.parameters()), want)
    assert not any(p.requires_grad for p in ours.averaged_model.parameters())


@pytest.mark.parametrize("store_delta", [False, True])
@pytest.mark.parametrize("base,base_kwargs", [(torch.optim.AdamW, dict(lr=1e-2)),
                                              (torch.optim.SGD, dict(lr=0.1, momentum=0.9))],
                         ids=["adamw", "sgd"])
def test_mechanic_matches_mechanic_pytorch(store_delta: bool, base: type, base_kwargs: dict[str, Any],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    mechanic_pytorch = pytest.importorskip("mechanic_pytorch")
    ref, _ = _train(lambda g: mechanic_pytorch.mechanize(base, store_delta=store_delta)(g, **base_kwargs))
    ours, _ = _train(lambda g: optimizers.Mechanic(g, base=base, base_kwargs=base_kwargs, store_delta=store_delta))
    _assert_close(ours, ref)
    _both_paths(lambda g, **f: optimizers.Mechanic(g, base=base, base_kwargs=base_kwargs,
                                                   store_delta=store_delta, **f), monkeypatch)


SF_CASES = [("AdamWScheduleFree", "ScheduleFreeAdamW", dict()),
            ("AdamWScheduleFree", "ScheduleFreeAdamW", dict(lr=1e-2, warmup_steps=20, r=0.75)),
            ("AdamWScheduleFree", "ScheduleFreeAdamW", dict(lr=5e-3, betas=(0.95, 0.99))),
            ("SGDScheduleFree", "ScheduleFreeSGD", dict(lr=0.05)),
            ("SGDScheduleFree", "ScheduleFreeSGD", dict(lr=0.1, warmup_steps=20, r=0.5, momentum=0.8))]


@pytest.mark.parametrize("ref_name,name,kw", SF_CASES, ids=[f"{c[1]}-{c[2]}" for c in SF_CASES])
def test_schedulefree_matches_schedulefree(ref_name: str, name: str, kw: dict[str, Any],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    schedulefree = pytest.importorskip("schedulefree")
    ref, ref_opt = _train(lambda g: getattr(schedulefree, ref_name)(g, **kw), train_mode=True)
    ours, opt = _train(lambda g: getattr(optimizers, name)(g, **kw), train_mode=True)
    _assert_close(ours, ref)  # y, the training point
    ref_opt.eval()
    opt.eval()
    _assert_close([p.detach() for g in opt.param_groups for p in g["params"]],
                  [p.detach() for g in ref_opt.param_groups for p in g["params"]])  # x, the evaluation point
    _both_paths(lambda g, **f: getattr(optimizers, name)(g, **kw, **f), monkeypatch)


def _nadamw_by_hand(groups: list[dict[str, Any]], *, lr: float, betas: tuple[float, float], eps: float):
    """The AlgoPerf NAdamW update written out with plain tensor arithmetic."""
    b1, b2 = betas
    state: dict[torch.Tensor, dict[str, Any]] = {}

    class ByHand:
        param_groups = groups

        def zero_grad(self) -> None:
            for g in groups:
                for p in g["params"]:
                    p.grad = None

        @torch.no_grad()
        def step(self) -> None:
            for g in groups:
                for p in g["params"]:
                    s = state.setdefault(p, {"t": 0, "m": torch.zeros_like(p), "v": torch.zeros_like(p)})
                    s["t"] += 1
                    t, grad = s["t"], p.grad
                    p.copy_(p * (1 - lr * g["weight_decay"]))
                    s["m"] = b1 * s["m"] + (1 - b1) * grad
                    s["v"] = b2 * s["v"] + (1 - b2) * grad * grad
                    m_hat = (b1 * s["m"] + (1 - b1) * grad) / (1 - b1 ** t)
                    v_hat = s["v"] / (1 - b2 ** t)
                    p.copy_(p - lr * m_hat / (v_hat.sqrt() + eps))

    return ByHand()


@pytest.mark.parametrize("kw", [dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8),
                                dict(lr=3e-3, betas=(1 - 0.06733926164, 0.9955159689799007), eps=1e-6)], ids=str)
def test_nadamw_matches_update_by_hand(kw: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    ref, _ = _train(lambda g: _nadamw_by_hand(g, **kw))
    ours, _ = _train(lambda g: optimizers.NAdamW(g, **kw))
    _assert_close(ours, ref)
    _both_paths(lambda g, **f: optimizers.NAdamW(g, **kw, **f), monkeypatch)


def test_nadamw_differs_from_torch_nadam_momentum_schedule() -> None:
    # torch.optim.NAdam decays its momentum (mu_t); the AlgoPerf baseline does not
    ours, _ = _train(lambda g: optimizers.NAdamW(g, lr=1e-2), steps=20)
    torch_nadam, _ = _train(lambda g: torch.optim.NAdam(g, lr=1e-2, decoupled_weight_decay=True), steps=20)
    assert max(((a - b).norm() / b.norm()).item() for a, b in zip(ours, torch_nadam)) > 1e-4
