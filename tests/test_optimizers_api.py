"""Public API of the optimizers package: factory, presets, validation, state_dict, groups, schedulers, modes."""
from __future__ import annotations

import copy
import os
import subprocess
import sys
from typing import Any

import pytest
import torch

import optimizers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CLASSES = {"nadamw": optimizers.NAdamW, "prodigy": optimizers.Prodigy, "dadapt_adam": optimizers.DAdaptAdam,
           "dadapt_sgd": optimizers.DAdaptSGD, "dog": optimizers.DoG, "ldog": optimizers.LDoG,
           "mechanic": optimizers.Mechanic, "schedulefree_adamw": optimizers.ScheduleFreeAdamW,
           "schedulefree_sgd": optimizers.ScheduleFreeSGD}


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.ReLU(), torch.nn.Linear(12, 3))


def _groups(model: torch.nn.Module) -> list[dict[str, Any]]:
    return [{"params": [model[0].weight, model[2].weight], "weight_decay": 0.05},
            {"params": [model[0].bias, model[2].bias], "weight_decay": 0.0}]


def _batch(t: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + t)
    return torch.randn(16, 6, generator=gen), torch.randn(16, 3, generator=gen)


def _steps(model: torch.nn.Module, opt: torch.optim.Optimizer, start: int, n: int, sched: Any = None) -> None:
    for t in range(start, start + n):
        x, y = _batch(t)
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
        if sched is not None:
            sched.step()


def test_names_and_presets_are_exported() -> None:
    assert optimizers.OPTIMIZERS == tuple(CLASSES)
    assert set(optimizers.PRESETS) == {"algoperf_nadamw", "algoperf_schedulefree_adamw"}
    nad = optimizers.PRESETS["algoperf_nadamw"]
    assert nad["lr"] == pytest.approx(0.0017486, rel=1e-4)
    assert 1 - nad["betas"][0] == pytest.approx(0.067339, rel=1e-4)
    assert nad["betas"][1] == pytest.approx(0.995516, rel=1e-5)
    assert nad["weight_decay"] == pytest.approx(0.081216, rel=1e-4)
    assert nad["warmup_fraction"] == 0.02
    sf = optimizers.PRESETS["algoperf_schedulefree_adamw"]
    assert (sf["lr"], 1 - sf["betas"][0], sf["r"], sf["weight_lr_power"]) == pytest.approx((0.0025, 0.1, 0.75, 2))
    assert sf["betas"][1] == pytest.approx(0.99552, rel=1e-5) and sf["weight_decay"] == pytest.approx(0.08122, rel=1e-4)
    for name in optimizers.__all__:
        assert hasattr(optimizers, name)


@pytest.mark.parametrize("name", list(CLASSES))
def test_create_builds_each_optimizer_with_published_defaults(name: str) -> None:
    model = _model()
    opt = optimizers.create(name, model.parameters())
    assert type(opt) is CLASSES[name] and isinstance(opt, torch.optim.Optimizer)
    _steps(model, opt, 0, 3)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_published_defaults() -> None:
    p = [torch.nn.Parameter(torch.zeros(2))]
    g = optimizers.Prodigy(p).param_groups[0]
    assert (g["lr"], g["betas"], g["beta3"], g["eps"], g["weight_decay"], g["decouple"], g["d0"], g["d_coef"],
            g["growth_rate"], g["slice_p"]) == (1.0, (0.9, 0.999), None, 1e-8, 0.0, True, 1e-6, 1.0, float("inf"), 1)
    g = optimizers.DAdaptAdam(p).param_groups[0]
    assert (g["lr"], g["betas"], g["eps"], g["weight_decay"], g["decouple"], g["d0"]) == (1.0, (0.9, 0.999), 1e-8,
                                                                                          0.0, False, 1e-6)
    g = optimizers.DAdaptSGD(p).param_groups[0]
    assert (g["lr"], g["momentum"], g["d0"]) == (1.0, 0.0, 1e-6)
    g = optimizers.DoG(p).param_groups[0]
    assert (g["reps_rel"], g["lr"], g["weight_decay"], g["eps"]) == (1e-6, 1.0, 0.0, 1e-8)
    m = optimizers.Mechanic(p)
    assert (m.s_decay, m.betas, m.s_init, m.eps) == (0.01, (0.9, 0.99, 0.999, 0.9999, 0.99999, 0.999999), 1e-8, 1e-8)
    assert isinstance(m.base, torch.optim.AdamW)
    g = optimizers.ScheduleFreeAdamW(p).param_groups[0]
    assert (g["lr"], g["betas"], g["eps"], g["weight_decay"], g["warmup_steps"], g["r"], g["weight_lr_power"]) == \
        (0.0025, (0.9, 0.999), 1e-8, 0.0, 0, 0.0, 2.0)
    g = optimizers.ScheduleFreeSGD(p).param_groups[0]
    assert (g["lr"], g["momentum"]) == (1.0, 0.9)


def test_create_applies_preset_then_overrides_and_drops_warmup_fraction() -> None:
    model = _model()
    opt = optimizers.create("nadamw", model.parameters(), preset="algoperf_nadamw", weight_decay=0.0)
    g = opt.param_groups[0]
    assert g["lr"] == optimizers.PRESETS["algoperf_nadamw"]["lr"] and g["weight_decay"] == 0.0
    assert "warmup_fraction" not in g
    opt = optimizers.create("schedulefree_adamw", model.parameters(), preset="algoperf_schedulefree_adamw")
    assert opt.param_groups[0]["r"] == 0.75


@pytest.mark.parametrize("call,needle", [
    (lambda ps: optimizers.create("adam", ps), "nadamw, prodigy"),
    (lambda ps: optimizers.create("nadamw", ps, preset="nope"), "algoperf_nadamw"),
    (lambda ps: optimizers.create("prodigy", ps, preset="algoperf_nadamw"), "for optimizer 'nadamw'"),
    (lambda ps: optimizers.create("prodigy", ps, learning_rate=1.0), "choose from: lr"),
])
def test_create_rejects_unknown_names_in_one_line(call: Any, needle: str) -> None:
    with pytest.raises(ValueError) as err:
        call(_model().parameters())
    assert needle in str(err.value) and "\n" not in str(err.value)


BAD = [
    (optimizers.Prodigy, dict(lr=0.0), "lr"), (optimizers.Prodigy, dict(betas=(0.9, 1.0)), "betas"),
    (optimizers.Prodigy, dict(d0=-1.0), "d0"), (optimizers.Prodigy, dict(slice_p=0), "slice_p"),
    (optimizers.Prodigy, dict(growth_rate=0.5), "growth_rate"), (optimizers.Prodigy, dict(eps=-1.0), "eps"),
    (optimizers.DAdaptAdam, dict(weight_decay=-0.1), "weight_decay"),
    (optimizers.DAdaptAdam, dict(betas=(2,)), "betas"),
    (optimizers.DAdaptSGD, dict(momentum=1.0), "momentum"), (optimizers.DoG, dict(reps_rel=0.0), "reps_rel"),
    (optimizers.LDoG, dict(init_eta=-1.0), "init_eta"), (optimizers.Mechanic, dict(betas=()), "betas"),
    (optimizers.Mechanic, dict(s_init=0.0), "s_init"), (optimizers.ScheduleFreeAdamW, dict(betas=(0.0, 0.9)), "betas"),
    (optimizers.ScheduleFreeAdamW, dict(warmup_steps=-1), "warmup_steps"),
    (optimizers.ScheduleFreeSGD, dict(momentum=0.0), "momentum"), (optimizers.NAdamW, dict(lr=float("nan")), "lr"),
    (optimizers.Prodigy, dict(comm=object()), "comm"),
]


@pytest.mark.parametrize("cls,kw,hyper", BAD, ids=[f"{c.__name__}-{h}" for c, _, h in BAD])
def test_bad_hyperparameters_raise_one_line_value_error(cls: type, kw: dict[str, Any], hyper: str) -> None:
    with pytest.raises(ValueError) as err:
        cls(_model().parameters(), **kw)
    msg = str(err.value)
    assert f"{hyper}=" in msg and cls.__name__ in msg and "\n" not in msg


def test_hyperparameters_after_lr_are_keyword_only() -> None:
    assert optimizers.Prodigy(_model().parameters(), 0.5).param_groups[0]["lr"] == 0.5  # lr positional, as in torch.optim
    with pytest.raises(TypeError):
        optimizers.Prodigy(_model().parameters(), 1.0, (0.9, 0.99))  # type: ignore[misc]


def test_shared_settings_must_agree_across_groups() -> None:
    model = _model()
    with pytest.raises(ValueError, match="betas="):
        optimizers.Prodigy([{"params": [model[0].weight]}, {"params": [model[2].weight], "betas": (0.5, 0.9)}])
    opt = optimizers.Prodigy(_groups(model))
    opt.param_groups[1]["lr"] = 0.5
    with pytest.raises(ValueError, match="same lr"):
        _steps(model, opt, 0, 1)


def _make(name: str, params: Any) -> torch.optim.Optimizer:
    kw = dict(base_kwargs=dict(lr=1e-2)) if name == "mechanic" else {}
    return optimizers.create(name, params, **kw)


@pytest.mark.parametrize("name", list(CLASSES))
def test_state_dict_round_trip_continues_the_same_trajectory(name: str) -> None:
    model = _model()
    opt = _make(name, _groups(model))
    _steps(model, opt, 0, 5)
    saved_model = copy.deepcopy(model.state_dict())
    saved = copy.deepcopy(opt.state_dict())
    _steps(model, opt, 5, 5)
    want = [p.detach().clone() for p in model.parameters()]

    model2 = _model(seed=1)  # different weights, overwritten below
    model2.load_state_dict(saved_model)
    opt2 = _make(name, _groups(model2))
    opt2.load_state_dict(saved)
    _steps(model2, opt2, 5, 5)
    for a, b in zip(model2.parameters(), want):
        torch.testing.assert_close(a.detach(), b, rtol=0, atol=0)


@pytest.mark.parametrize("name", list(CLASSES))
def test_deepcopy_and_pickle_keep_a_working_optimizer(name: str) -> None:
    import pickle

    model = _model()
    opt = _make(name, _groups(model))
    _steps(model, opt, 0, 2)
    for clone in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert type(clone) is type(opt)
        assert clone.state_dict()["param_groups"] == opt.state_dict()["param_groups"]
    both = copy.deepcopy({"m": model, "o": opt})  # model and optimizer copied together share parameters
    _steps(both["m"], both["o"], 2, 2)
    _steps(model, opt, 2, 2)
    for a, b in zip(both["m"].parameters(), model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("name", list(CLASSES))
def test_lr_scheduler_drives_every_group(name: str) -> None:
    model = _model()
    opt = _make(name, _groups(model))
    base = [g["lr"] for g in opt.param_groups]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (1 + t))
    _steps(model, opt, 0, 4, sched)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([b / 5 for b in base])


def test_zero_lr_step_leaves_parameters_alone() -> None:
    for name in ("dog", "nadamw", "schedulefree_sgd"):
        model = _model()
        opt = _make(name, model.parameters())
        opt.param_groups[0]["lr"] = 0.0 if name != "dog" else 1e-300
        before = [p.detach().clone() for p in model.parameters()]
        _steps(model, opt, 0, 1)
        for a, b in zip(model.parameters(), before):
            assert torch.allclose(a, b, atol=1e-12)


def test_params_without_grad_are_skipped() -> None:
    for name in CLASSES:
        model = _model()
        opt = _make(name, model.parameters())
        model[2].bias.requires_grad_(False)
        frozen = model[2].bias.detach().clone()
        _steps(model, opt, 0, 2)
        assert torch.equal(model[2].bias, frozen), name


def test_grads_are_not_modified() -> None:
    for name in CLASSES:
        model = _model()
        opt = optimizers.create(name, _groups(model), **({"decouple": False} if name == "prodigy" else {}))
        x, y = _batch(0)
        ((model(x) - y) ** 2).mean().backward()
        grads = [p.grad.clone() for p in model.parameters()]
        opt.step()
        for p, g in zip(model.parameters(), grads):
            assert torch.equal(p.grad, g), name


@pytest.mark.parametrize("name", ["schedulefree_adamw", "schedulefree_sgd"])
def test_schedulefree_train_eval(name: str) -> None:
    model = _model()
    opt = _make(name, model.parameters())
    _steps(model, opt, 0, 5)
    y = [p.detach().clone() for p in model.parameters()]
    opt.eval()
    opt.eval()  # idempotent
    x = [p.detach().clone() for p in model.parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(x, y))
    with pytest.raises(RuntimeError, match="eval mode"):
        opt.step()
    opt.train()
    for a, b in zip(model.parameters(), y):
        torch.testing.assert_close(a.detach(), b)
    _steps(model, opt, 5, 1)


def test_mechanic_wraps_an_existing_optimizer_and_shares_its_groups() -> None:
    model = _model()
    base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt = optimizers.Mechanic(base)
    assert opt.param_groups is base.param_groups
    _steps(model, opt, 0, 3)
    assert opt.state["_tuner"]["iter_count"] == 3 and sum(opt.state["_tuner"]["s"]) > 0
    with pytest.raises(ValueError, match="base="):
        optimizers.Mechanic(base, base=torch.optim.AdamW)


def test_closure_is_evaluated_once_per_step() -> None:
    for name in CLASSES:
        model = _model()
        opt = _make(name, model.parameters())
        calls = []
        x, y = _batch(0)

        def closure() -> torch.Tensor:
            calls.append(1)
            opt.zero_grad()
            loss = ((model(x) - y) ** 2).mean()
            loss.backward()
            return loss

        loss = opt.step(closure)
        assert len(calls) == 1 and torch.is_tensor(loss), name


def test_float32_and_bfloat16_params_run() -> None:
    for dtype in (torch.float32, torch.bfloat16):
        for name in CLASSES:
            model = _model().to(dtype)
            opt = _make(name, model.parameters())
            x, y = _batch(0)
            for _ in range(3):
                opt.zero_grad()
                ((model(x.to(dtype)) - y.to(dtype)) ** 2).float().mean().backward()
                opt.step()
            assert all(torch.isfinite(p.float()).all() for p in model.parameters()), (name, dtype)


def test_import_needs_no_dtrain_and_does_no_work() -> None:
    code = ("import sys, time; t = time.perf_counter(); import optimizers; "
            "assert not any(m == 'dtrain' or m.startswith('dtrain.') for m in sys.modules), 'dtrain imported'; "
            "assert 'torch.distributed' not in sys.modules or True; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
