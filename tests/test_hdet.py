"""HDET: the OneCycle curve, the fan-out, the converge step, the auto-LR controller, resume."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

import optimizers

from dtrain.algorithms.hdet import HDET, decay_rate, multipliers, softmax_weights
from dtrain.comm.local import run_local
from dtrain.config import ConfigError, load
from dist_utils import REPO


def _opt(kind: str, groups: int = 1) -> torch.optim.Optimizer:
    params = [{"params": [nn.Parameter(torch.zeros(3))]} for _ in range(groups)]
    if kind == "sgd":
        return torch.optim.SGD(params, lr=0.1, momentum=0.9)
    return torch.optim.AdamW(params, lr=0.1, betas=(0.9, 0.99), weight_decay=0.01)


def _momenta(opt: torch.optim.Optimizer) -> list[float]:
    return [g["betas"][0] if "betas" in g else g["momentum"] for g in opt.param_groups]


ONECYCLE_GRID = [
    ("sgd", 1, dict(max_lr=0.1, total_steps=100)),
    ("adamw", 1, dict(max_lr=0.03, total_steps=97, anneal_strategy="linear")),
    ("sgd", 1, dict(max_lr=0.1, total_steps=100, three_phase=True)),
    ("adamw", 1, dict(max_lr=0.01, total_steps=64, three_phase=True, anneal_strategy="linear", pct_start=0.4)),
    ("adamw", 1, dict(max_lr=0.02, epochs=3, steps_per_epoch=17, pct_start=0.25)),
    ("sgd", 3, dict(max_lr=[0.1, 0.01, 0.5], total_steps=50, div_factor=10.0, final_div_factor=100.0,
                    base_momentum=[0.8, 0.85, 0.7], max_momentum=[0.9, 0.95, 0.99])),
    ("adamw", 2, dict(max_lr=[0.004, 0.001], total_steps=40, cycle_momentum=False)),
]


def _compare_with_torch(kind: str, groups: int, kwargs: dict, **hdet_kwargs) -> None:
    ref_opt, our_opt = _opt(kind, groups), _opt(kind, groups)
    ref = torch.optim.lr_scheduler.OneCycleLR(ref_opt, **kwargs)
    ours = HDET(our_opt, **kwargs, **hdet_kwargs)
    total = kwargs.get("total_steps") or kwargs["epochs"] * kwargs["steps_per_epoch"]
    for step in range(total + 1):
        assert [g["lr"] for g in our_opt.param_groups] == [g["lr"] for g in ref_opt.param_groups], step
        assert _momenta(our_opt) == _momenta(ref_opt), step
        assert ours.get_last_lr() == ref.get_last_lr()
        if step < total:
            ref_opt.step(), our_opt.step()
            ref.step(), ours.step(1.0)
    with pytest.raises(ValueError, match="Tried to step"):  # past the end: torch's error too
        ours.step()


@pytest.mark.parametrize("kind,groups,kwargs", ONECYCLE_GRID)
def test_one_replica_equals_onecycle_exactly(kind, groups, kwargs):
    _compare_with_torch(kind, groups, kwargs, converge_every=7)  # HDET's other defaults: spread 0.2, auto-LR on
    _compare_with_torch(kind, groups, kwargs, converge_every=7, auto_lr_mode="scale", spacing="log", spread=3.0)


def test_positional_arguments_match_onecycle():
    ours = HDET(_opt("sgd"), 0.1, 20, None, None, 0.25, "linear", True, 0.8, 0.9, 5.0, 50.0, True)
    ref_opt = _opt("sgd")
    torch.optim.lr_scheduler.OneCycleLR(ref_opt, 0.1, 20, None, None, 0.25, "linear", True, 0.8, 0.9, 5.0, 50.0, True)
    assert ours.optimizer.param_groups[0]["lr"] == ref_opt.param_groups[0]["lr"]
    assert ours.optimizer.param_groups[0]["min_lr"] == ref_opt.param_groups[0]["min_lr"]


def test_four_replicas_without_spread_or_auto_lr_equal_onecycle():
    def worker(comm):
        _compare_with_torch("adamw", 2, dict(max_lr=[0.01, 0.002], total_steps=30, three_phase=True),
                            spread=0.0, auto_lr=False, converge_every=5, comm=comm)
        return True

    assert all(run_local(4, worker))


@pytest.mark.parametrize("n", range(1, 10))
@pytest.mark.parametrize("a", [0.0, 1 / 9, 0.5, 0.9])
def test_multipliers_average_one_and_stay_in_range(n, a):
    rho = multipliers(n, a)
    assert math.isclose(sum(rho) / n, 1.0, abs_tol=1e-12)
    assert all(1 - a - 1e-12 <= x <= 1 + a + 1e-12 for x in rho)
    if n > 1:
        assert math.isclose(min(rho), 1 - a) and math.isclose(max(rho), 1 + a)


def test_spread_is_applied_and_reshuffled_from_a_shared_seed():
    """The paper's code applied the spread only when world sizes differed: here each replica's lr is ρ × OneCycle."""
    n, a, total, every = 4, 0.3, 40, 5
    rho = multipliers(n, a)

    def worker(comm):
        opt = _opt("sgd")
        ref_opt = _opt("sgd")
        ref = torch.optim.lr_scheduler.OneCycleLR(ref_opt, max_lr=0.1, total_steps=total)
        sched = HDET(opt, max_lr=0.1, total_steps=total, spread=a, converge_every=every, auto_lr=False, comm=comm, seed=3)
        seen = []
        for _ in range(total):
            ratio = opt.param_groups[0]["lr"] / ref_opt.param_groups[0]["lr"]
            seen.append(ratio)
            assert math.isclose(ratio, sched.multiplier("lr"), rel_tol=1e-12)
            opt.step(), ref_opt.step()
            sched.step(), ref.step()
        return seen

    per_replica = run_local(n, worker)
    for step in range(total):
        got = sorted(r[step] for r in per_replica)
        assert all(math.isclose(x, y, rel_tol=1e-12) for x, y in zip(got, rho)), step  # a permutation of ρ
    assignments = {tuple(round(r[s], 9) for r in per_replica) for s in range(0, total, every)}
    assert len(assignments) > 2  # re-dealt at converge steps


def _data(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 * rank + step)
    x = torch.randn(8, 4, generator=gen)
    return x, x @ torch.tensor([1.0, -2.0, 0.5, 3.0]) + 0.1 * torch.randn(8, generator=gen)


def _model() -> nn.Module:
    model = nn.Linear(4, 1)
    with torch.no_grad():
        model.weight.fill_(0.1)
        model.bias.zero_()
    return model


def _train_step(model, opt, sched, rank, step) -> float:
    """One step; returns the lr the step used."""
    x, y = _data(rank, step)
    lr = opt.param_groups[0]["lr"]
    loss = ((model(x).squeeze(-1) - y) ** 2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    sched.step(loss)
    return lr


@pytest.mark.parametrize("auto_lr", [False, True])
def test_converge_makes_replicas_identical_even_with_auto_lr_off(auto_lr):
    """The paper's code never averaged with auto-LR off; here every T steps all replicas hold the mean."""
    every = 4

    def worker(comm):
        model = _model()
        opt = torch.optim.AdamW(model.parameters(), lr=0.05)
        sched = HDET(opt, max_lr=0.05, total_steps=12, spread=0.5, converge_every=every, auto_lr=auto_lr,
                     auto_lr_warmup=0, average_optimizer_state=True, comm=comm)
        snapshots = []
        for step in range(12):
            x, y = _data(comm.rank, step)
            loss = ((model(x).squeeze(-1) - y) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            before = [p.detach().clone() for p in model.parameters()]
            sched.step(loss)
            state = [opt.state[p]["exp_avg"].clone() for p in model.parameters()]
            snapshots.append((before, [p.detach().clone() for p in model.parameters()], state))
        return snapshots

    runs = run_local(3, worker)
    for step in range(12):
        after = [r[step][1] for r in runs]
        if (step + 1) % every == 0:
            mean = [sum(r[step][0][i] for r in runs) / 3 for i in range(2)]
            for replica in after:
                assert all(torch.equal(a, b) for a, b in zip(replica, after[0]))
                assert all(torch.allclose(a, m, atol=1e-7) for a, m in zip(replica, mean))
            states = [r[step][2] for r in runs]
            assert all(torch.equal(a, b) for s in states for a, b in zip(s, states[0]))
        else:
            assert not all(torch.equal(a, b) for a, b in zip(after[1], after[0]))  # replicas train apart


def test_a_diverged_replica_is_left_out_of_the_average():
    def worker(comm):
        p = nn.Parameter(torch.full((3,), float(comm.rank)))
        opt = torch.optim.SGD([p], lr=0.1)
        sched = HDET(opt, max_lr=0.1, total_steps=4, converge_every=2, broadcast_init=False, comm=comm)
        if comm.rank == 2:
            with torch.no_grad():
                p[1] = float("nan")
        opt.step(), sched.step()
        opt.step(), sched.step()  # converge
        return p.detach().clone()

    for got in run_local(3, worker):
        assert torch.equal(got, torch.full((3,), 0.5))  # mean of replicas 0 and 1


def _controller_run(loss_of_multiplier, *, total=100, every=5, warmup=50, n=4):
    """Base lr after each converge when every replica reports loss_of_multiplier(its multiplier)."""

    def worker(comm):
        opt = _opt("sgd")
        sched = HDET(opt, max_lr=0.1, total_steps=total, spread=0.5, converge_every=every, auto_lr_warmup=warmup,
                     auto_lr_mode="additive", auto_lr_alpha=None, auto_lr_beta=0.5, auto_lr_sigma=0.05,
                     auto_lr_gain=1.0, cycle_momentum=False, comm=comm, seed=1)
        bases = []
        for step in range(total):
            opt.step()
            sched.step(loss_of_multiplier(sched.multiplier("lr")))
            if (step + 1) % every == 0 and step + 1 >= warmup:
                bases.append(sched.base_values("lr")[0])
                assert math.isclose(opt.param_groups[0]["lr"], bases[-1] * sched.multiplier("lr"), rel_tol=1e-12) or step + 1 == total
        return bases, opt.param_groups[0]["min_lr"], sched

    return run_local(n, worker)


def test_auto_lr_moves_base_towards_the_lower_loss_multipliers():
    neutral = _controller_run(lambda rho: 1.0)[0][0]
    high_wins = _controller_run(lambda rho: 1.0 - 0.1 * rho)[0][0]
    low_wins = _controller_run(lambda rho: 1.0 + 0.1 * rho)[0][0]
    for k in range(3):  # first converge steps, before the floor clamps anything
        assert high_wins[k] > neutral[k] > low_wins[k], k
    # With a consistent winner the base keeps moving that way relative to the no-signal path.
    assert high_wins[2] / neutral[2] > high_wins[0] / neutral[0] > 1 > low_wins[0] / neutral[0] > low_wins[2] / neutral[2]


def test_decay_goes_towards_the_onecycle_floor():
    """γ has the right sign: with no loss signal the base lr shrinks geometrically onto min_lr, never past it."""
    total, every, warmup = 100, 5, 50
    results = _controller_run(lambda rho: 1.0, total=total, every=every, warmup=warmup)
    bases, floor, sched = results[0]
    assert all(r[0] == bases for r in results)  # every replica computes the same controller
    ref_opt = _opt("sgd")
    ref = torch.optim.lr_scheduler.OneCycleLR(ref_opt, max_lr=0.1, total_steps=total, cycle_momentum=False)
    ref_lrs = []
    for _ in range(total):
        ref_lrs.append(ref_opt.param_groups[0]["lr"])
        ref_opt.step(), ref.step()
    # The floor: OneCycle's lr at its last step, max_lr / (div_factor · final_div_factor).
    assert math.isclose(floor, 0.1 / (25.0 * 1e4), rel_tol=1e-12) and math.isclose(ref_lrs[total - 1], floor, rel_tol=1e-9)
    start, k_total = ref_lrs[warmup], (total - warmup) / every  # the controller takes over from the curve
    for k, base in enumerate(bases[:-1]):
        assert math.isclose(base, start * (floor / start) ** ((k + 1) / k_total), rel_tol=1e-9), k
    gaps = [b - floor for b in bases]
    assert all(g2 < g1 for g1, g2 in zip(gaps, gaps[1:-1]))  # strictly towards the floor
    assert min(bases) >= floor and math.isclose(bases[-2], floor, rel_tol=1e-9)  # on it at the last interval
    # The paper's code used ln(div_factor / final_div_factor) < 0: a negative γ that grows the lr.
    assert decay_rate(start, floor, k_total) > 0 > 1 - math.exp(-math.log(25.0 / 1e4) / k_total)


def test_constructor_and_converges_leave_the_global_rng_alone():
    torch.manual_seed(123)
    before = torch.get_rng_state()

    def worker(comm):
        opt = _opt("adamw")
        sched = HDET(opt, max_lr=0.01, total_steps=30, spread=0.5, converge_every=3, auto_lr_warmup=0, comm=comm)
        for _ in range(30):
            opt.step()
            sched.step(float(comm.rank))
        return sched.converges

    assert run_local(4, worker) == [10] * 4
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize("mode,alpha", [("additive", None), ("scale", None), ("scale", 0.05)])
def test_state_dict_resume_is_exact(mode, alpha):
    total, cut = 30, 17

    def build(comm):
        model = _model()
        opt = torch.optim.AdamW(model.parameters(), lr=0.05)
        sched = HDET(opt, max_lr=0.05, total_steps=total, spread=0.5, converge_every=5, auto_lr_warmup=5,
                     auto_lr_sigma=0.5, auto_lr_mode=mode, spacing="log" if mode == "scale" else "linear",
                     auto_lr_window=3, auto_lr_alpha=alpha, comm=comm, seed=7)
        return model, opt, sched

    def straight(comm):
        model, opt, sched = build(comm)
        lrs = [_train_step(model, opt, sched, comm.rank, s) for s in range(total)]
        return lrs, [p.detach().clone() for p in model.parameters()], sched.base_values("lr")

    def resumed(comm):
        model, opt, sched = build(comm)
        lrs = [_train_step(model, opt, sched, comm.rank, s) for s in range(cut)]
        blob = io.BytesIO()
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}, blob)
        blob.seek(0)
        saved = torch.load(blob, weights_only=True)
        model, opt, sched = build(comm)
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"])
        sched.load_state_dict(saved["sched"])
        lrs += [_train_step(model, opt, sched, comm.rank, s) for s in range(cut, total)]
        return lrs, [p.detach().clone() for p in model.parameters()], sched.base_values("lr")

    for a, b in zip(run_local(2, straight), run_local(2, resumed)):
        assert a[0] == b[0]
        assert all(torch.equal(x, y) for x, y in zip(a[1], b[1]))
        assert a[2] == b[2] and a[2][0] is not None


def test_grad_sync_keeps_replicas_identical_every_step():
    def worker(comm):
        model = _model()
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        sched = HDET(opt, max_lr=0.05, total_steps=10, spread=0.0, converge_every=1000, grad_sync=True, comm=comm)
        out = []
        for step in range(10):
            _train_step(model, opt, sched, comm.rank, step)
            out.append([p.detach().clone() for p in model.parameters()])
        return out, comm.stats.collectives

    (a, ca), (b, cb) = run_local(2, worker)
    assert all(torch.equal(x, y) for sa, sb in zip(a, b) for x, y in zip(sa, sb))
    assert ca == cb == 1 + 10  # the initial broadcast, then one gradient all-reduce per step


def test_explores_other_hyperparameters():
    def worker(comm):
        opt = _opt("adamw")
        sched = HDET(opt, max_lr=0.01, total_steps=20, spread=0.5, converge_every=5, explore=["lr", "weight_decay", "betas[1]"],
                     auto_lr_warmup=5, auto_lr_mode="additive", auto_lr_alpha=None, auto_lr_sigma=0.1, per_group=True,
                     comm=comm, seed=2)
        g = opt.param_groups[0]
        assert math.isclose(g["weight_decay"], 0.01 * sched.multiplier("weight_decay"))
        assert math.isclose(1 - g["betas"][1], 0.01 * sched.multiplier("betas[1]"))
        for _ in range(20):
            opt.step()
            sched.step(1.0 + 0.1 * sched.multiplier("weight_decay"))  # low weight decay wins
        return sched.base_values("weight_decay")[0], g["betas"][1]

    for wd, beta2 in run_local(2, worker):
        assert wd < 0.01 and 0 < beta2 < 1


def test_bad_arguments_name_what_to_change():
    with pytest.raises(ValueError, match="spread"):
        HDET(_opt("sgd"), max_lr=0.1, total_steps=10, spread=1.5)
    with pytest.raises(ValueError, match="explore entry 'dropout'"):
        HDET(_opt("sgd"), max_lr=0.1, total_steps=10, explore=["dropout"])
    with pytest.raises(ValueError, match="cycle_momentum"):
        HDET(_opt("sgd"), max_lr=0.1, total_steps=10, explore=["momentum"])
    with pytest.raises(ValueError, match="total_steps"):
        HDET(_opt("sgd"), max_lr=0.1)
    with pytest.raises(ConfigError, match="algo.spread"):
        load(REPO / "configs/hdet.yaml", ["algo.spread=1.5"])
    with pytest.raises(ConfigError, match="algo.converge_every"):
        load(REPO / "configs/hdet.yaml", ["algo.converge_every=0"])
    with pytest.raises(ValueError, match="spacing=log"):
        HDET(_opt("sgd"), max_lr=0.1, total_steps=10, spread=1.0)
    with pytest.raises(ValueError, match="auto_lr_mode"):
        HDET(_opt("sgd"), max_lr=0.1, total_steps=10, auto_lr_mode="multiply")
    with pytest.raises(ConfigError, match="algo.spacing"):
        load(REPO / "configs/hdet.yaml", ["algo.spacing=cubic"])
    with pytest.raises(ConfigError, match="algo.auto_lr_window"):
        load(REPO / "configs/hdet.yaml", ["algo.converge_every=5", "algo.auto_lr_window=6"])
    with pytest.raises(ConfigError, match="algo.auto_lr_stop"):
        load(REPO / "configs/hdet.yaml", ["algo.auto_lr_stop=-1"])
    with pytest.raises(ConfigError, match="algo.probe_batches"):
        load(REPO / "configs/hdet.yaml", ["algo.probe_batches=-1"])
    with pytest.raises(TypeError, match="probe"):
        HDET(_opt("sgd"), max_lr=0.1, total_steps=10, probe=3)


@pytest.mark.timeout(240)
def test_torchrun_gloo_replicas_identical_after_converge_and_comm_counted(tmp_path):
    """Real processes: `dtrain train` under torchrun/gloo; the last step is a converge step."""
    from dist_utils import train

    from dtrain.comm.base import ring_allreduce_bytes
    from dtrain.workloads.char_lm import GPT

    tiny = ["workload.n_layer=1", "workload.d_model=32", "workload.eval_batches=2", "threads=1"]
    summary = train(2, "configs/hdet.yaml", tmp_path / "run", "steps=40", "eval_every=40", "ckpt_every=0",
                    "algo.converge_every=10", "algo.auto_lr_warmup=10", "algo.probe_batches=1", *tiny)
    workers = summary["workers"]
    assert len(workers) == 2
    assert workers[0]["eval"]["val_loss"] == workers[1]["eval"]["val_loss"]  # identical parameters
    assert workers[0]["algorithm"]["converges"] == 4
    assert workers[0]["algorithm"]["base_lr"] == workers[1]["algorithm"]["base_lr"]
    # With a probe the training losses are ignored: finite scores here mean the probe scored both replicas.
    scores = workers[0]["algorithm"]["last_scores"]
    assert len(scores) == 2 and all(math.isfinite(x) for x in scores) and scores == workers[1]["algorithm"]["last_scores"]
    lrs = sorted(w["algorithm"]["final_lr"][0] for w in workers)
    assert lrs[0] < lrs[1]  # the replicas still train at different lrs
    n_params = sum(p.numel() for p in GPT(vocab=256, seq_len=64, n_layer=1, n_head=4, d_model=32).parameters())
    expected = 4 * ring_allreduce_bytes(4 * (n_params + 1), 2) + 4 * ring_allreduce_bytes(8 * 2 * 2, 2)
    for w in workers:  # per converge: one parameter all-reduce (+1 count), one 32-byte loss all-reduce; the probe is local
        assert w["comm"]["collectives"] == 8
        assert w["comm"]["bytes_sent"] == expected


def test_torchrun_gloo_selection_with_prodigy_leaves_the_replicas_identical(tmp_path):
    """Real processes: the selection start over gloo with an optimizer that keeps d in its param groups.
    With grad sync after the selection, both workers must hold the same weights and the same d at the
    end, 5 steps after the last converge (which would otherwise hide a drift by averaging)."""
    from dist_utils import train

    from dtrain import checkpoint

    tiny = ["workload.n_layer=1", "workload.d_model=32", "workload.eval_batches=2", "threads=1"]
    out = tmp_path / "run"
    summary = train(2, "configs/hdet.yaml", out, "steps=35", "eval_every=35", "ckpt_every=35",
                    "algo.auto_lr_mode=scale", "algo.select_steps=10", "algo.auto_lr_stop=10", "algo.grad_sync=true",
                    "algo.converge_every=10", "algo.auto_lr_warmup=10", "algo.probe_batches=1",
                    "optim.name=prodigy", "optim.lr=1.0", *tiny)
    assert summary["workers"][0]["algorithm"]["converges"] == 3
    a, b = (checkpoint.load(out, rank, 35) for rank in (0, 1))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    d = [[g["d"] for g in state["optimizer"]["param_groups"]] for state in (a, b)]
    assert d[0] == d[1] and d[0][0] > 1e-6  # d grew from d0 and is the same on both


# -- options beyond DESIGN's defaults: log spacing, the scale controller, the loss window, the stop -----
@pytest.mark.parametrize("n", [1, 2, 4, 7])
@pytest.mark.parametrize("a", [0.0, 0.5, 1.0, 3.0])
def test_log_multipliers_have_geometric_mean_one(n, a):
    rho = multipliers(n, a, spacing="log")
    assert math.isclose(math.prod(rho), 1.0, rel_tol=1e-12)
    assert all(1 / (1 + a) - 1e-12 <= x <= 1 + a + 1e-12 for x in rho)
    if n > 1:
        assert math.isclose(min(rho), 1 / (1 + a)) and math.isclose(max(rho), 1 + a)
        assert all(math.isclose(y / x, rho[1] / rho[0]) for x, y in zip(rho, rho[1:]))  # evenly spaced in log


def _scale_run(loss_of_multiplier, *, total=60, every=5, warmup=10, stop=None, window=None):
    """lr / (OneCycle lr × ρ) = c at every step, and c after each converge, per replica."""

    def worker(comm):
        opt, ref_opt = _opt("sgd"), _opt("sgd")
        ref = torch.optim.lr_scheduler.OneCycleLR(ref_opt, max_lr=0.1, total_steps=total, cycle_momentum=False)
        sched = HDET(opt, max_lr=0.1, total_steps=total, spread=1.0, spacing="log", converge_every=every,
                     auto_lr_warmup=warmup, auto_lr_mode="scale", auto_lr_stop=stop, auto_lr_window=window,
                     auto_lr_beta=0.5, auto_lr_sigma=0.05, auto_lr_gain=1.0, auto_lr_alpha=None, cycle_momentum=False,
                     comm=comm, seed=1)
        scales = []
        for step in range(total):
            c = opt.param_groups[0]["lr"] / (ref_opt.param_groups[0]["lr"] * sched.multiplier("lr"))
            assert math.isclose(c, sched.scale_values("lr")[0], rel_tol=1e-9), step  # the curve, scaled
            opt.step(), ref_opt.step()
            sched.step(loss_of_multiplier(sched.multiplier("lr"), step)), ref.step()
            if (step + 1) % every == 0:
                scales.append(sched.scale_values("lr")[0])
        return scales, sched

    return run_local(4, worker)


def test_scale_controller_multiplies_the_onecycle_curve_towards_the_winners():
    neutral = _scale_run(lambda rho, s: 1.0)[0][0]
    assert neutral == [1.0] * len(neutral)  # no signal: exactly the OneCycle curve (× ρ), no decay of its own
    high = _scale_run(lambda rho, s: 1.0 - 0.1 * rho)
    low = _scale_run(lambda rho, s: 1.0 + 0.1 * rho)
    assert all(r[0] == high[0][0] for r in high)  # every replica computes the same c
    up, down = high[0][0], low[0][0]
    assert up[0] == 1.0 == down[0]  # warm-up: the controller starts at step 10
    assert all(b > a for a, b in zip(up[1:], up[2:])) and all(b < a for a, b in zip(down[1:], down[2:]))
    # By hand: w = softmax((mean L − L_r)/σ), Δ = Σ w ln ρ − mean ln ρ, v = b·v + (1 − b)·Δ, ln c += λ·v.
    rho = multipliers(4, 1.0, spacing="log")
    weights = softmax_weights([1.0 - 0.1 * r for r in rho], 0.05)
    delta = sum(w * math.log(r) for w, r in zip(weights, rho))  # mean ln ρ = 0 (geometric mean 1)
    v, c = 0.0, 1.0
    for got in up[1:4]:
        v = 0.5 * v + 0.5 * delta
        c *= math.exp(v)
        assert math.isclose(got, c, rel_tol=1e-12)


def test_scale_controller_stops_steering_at_auto_lr_stop():
    results = _scale_run(lambda rho, s: 1.0 - 0.1 * rho, stop=30)
    scales, sched = results[0]
    assert scales[5] > scales[4] > 1.0  # moving up to the converge at step 30 (its interval counts) ...
    assert scales[5:] == [scales[5]] * len(scales[5:])  # ... frozen afterwards
    assert all(r[1].multiplier("lr") == 1.0 for r in results)  # fan-in: every replica at c × the curve
    assert sched.optimizer.param_groups[0]["lr"] == sched.base_values("lr")[0]


def test_loss_window_counts_only_the_last_steps_of_each_interval():
    # Early steps of each interval favour low multipliers, the last two favour high ones.
    def loss(rho, step):
        return 1.0 - 0.1 * rho if step % 5 >= 3 else 1.0 + 10.0 * rho

    full = _scale_run(loss)[0]
    late = _scale_run(loss, window=2)[0]
    assert full[0][-1] < 1.0 < late[0][-1]
    assert late[1].log[0]["losses"] != full[1].log[0]["losses"]


# -- the probe: shared batches, interval-mean parameters ----------------------------------------------
def _value(rank: int, step: int) -> float:
    return 100.0 * rank + step * step  # not linear in the step: the interval's mean differs from its middle


def _probe_run(*, with_probe: bool, total=30, every=5, warmup=10, stop=20):
    """Parameters set by hand each step; the probe records what it sees and favours high multipliers,
    while the training losses fed to step() favour low ones."""

    def worker(comm):
        p = nn.Parameter(torch.zeros(1, dtype=torch.float64))
        opt = torch.optim.SGD([p], lr=0.1)
        seen, after = [], []

        def probe(index):
            seen.append((index, p.item()))
            return 1.0 - 0.1 * sched.multiplier("lr")

        sched = HDET(opt, max_lr=0.1, total_steps=total, spread=1.0, spacing="log", converge_every=every,
                     auto_lr_warmup=warmup, auto_lr_mode="scale", auto_lr_stop=stop, auto_lr_beta=0.5,
                     auto_lr_sigma=0.05, auto_lr_gain=1.0, auto_lr_alpha=None, cycle_momentum=False, comm=comm, seed=1,
                     probe=probe if with_probe else None)
        for step in range(total):
            with torch.no_grad():
                p.fill_(_value(comm.rank, step))
            opt.step()  # no gradient: leaves p as set
            sched.step(1.0 + 0.1 * sched.multiplier("lr"))
            if (step + 1) % every == 0:
                after.append(p.item())
        return seen, after, sched.scale_values("lr")[0]

    return run_local(4, worker)


def test_probe_scores_each_replica_at_its_interval_mean_then_averages_the_last_iterates():
    results = _probe_run(with_probe=True)
    for rank, (seen, after, _) in enumerate(results):
        # converges at steps 5, 10, 15, 20, 25, 30 have indices 0..5; the probe runs from the warm-up (10)
        # to the stop (20) only
        assert [i for i, _ in seen] == [1, 2, 3]
        for (index, value), done in zip(seen, (10, 15, 20)):
            interval = range(done - 5, done)
            assert value == pytest.approx(sum(_value(rank, s) for s in interval) / 5, rel=1e-12)
        # the probe's swap is undone: the average is over every replica's last iterate, not its mean
        for done, value in zip(range(5, 31, 5), after):
            assert value == pytest.approx(sum(_value(r, done - 1) for r in range(4)) / 4, rel=1e-12)


def test_probe_replaces_the_training_losses_as_the_controllers_signal():
    probed = [r[2] for r in _probe_run(with_probe=True)]
    trained = [r[2] for r in _probe_run(with_probe=False)]
    assert len(set(probed)) == 1 and len(set(trained)) == 1  # every replica computes the same c
    assert probed[0] > 1.0 > trained[0]


def test_iterate_mean_restores_the_parameters_when_the_probe_fails():
    from dtrain.algorithms.hdet_probe import IterateMean

    params = [torch.tensor([1.0, 2.0]), torch.tensor([3.0])]
    mean = IterateMean()
    for shift in (0.0, 2.0):
        mean.add([x + shift for x in params])

    def broken(index):
        assert params[0].tolist() == [2.0, 3.0]  # sees the mean of (x, x + 2)
        raise RuntimeError("probe failed")

    with pytest.raises(RuntimeError, match="probe failed"):
        mean.score(params, broken, 0)
    assert params[0].tolist() == [1.0, 2.0] and params[1].tolist() == [3.0]
    assert mean.score(params, lambda i: float("nan"), 0) is None  # a non-finite score counts as none


# -- the selection start: replicas apart at c = range^u, then everyone takes the best one ---------------
def _select_run(*, grad_sync: bool, use_probe: bool, total: int = 40, select: int = 10):
    best = 10 ** (1 / 3)  # the third replica's factor (factors 10^u, u = -1, -1/3, 1/3, 1)

    def worker(comm):
        p = nn.Parameter(torch.zeros(3, dtype=torch.float64))
        opt, ref_opt = torch.optim.SGD([p], lr=0.1, momentum=0.9), _opt("sgd")
        ref = torch.optim.lr_scheduler.OneCycleLR(ref_opt, max_lr=0.1, total_steps=total, cycle_momentum=False)

        def score(index=None):  # lowest for the replica whose factor is `best`
            return abs(math.log(sched.multiplier("lr") / best))

        sched = HDET(opt, max_lr=0.1, total_steps=total, spread=0.5, spacing="log", converge_every=5,
                     auto_lr_warmup=5, auto_lr_mode="scale", auto_lr_stop=select, select_steps=select,
                     select_range=10.0, cycle_momentum=False, grad_sync=grad_sync, comm=comm, seed=1,
                     probe=score if use_probe else None)
        start = comm.stats.collectives
        factors, snapshot, taken, apart_collectives, mid = [], None, None, None, None
        for step in range(total):
            factors.append(opt.param_groups[0]["lr"] / ref_opt.param_groups[0]["lr"])
            p.grad = torch.full_like(p, 1.0 + comm.rank)  # replicas see different gradients
            loss = score()
            opt.step(), ref_opt.step()
            if step == select - 1:
                snapshot = (p.detach().clone(), opt.state[p]["momentum_buffer"].clone())
                apart_collectives = comm.stats.collectives - start
            sched.step(loss), ref.step()
            if step == select - 1:
                taken = (p.detach().clone(), opt.state[p]["momentum_buffer"].clone())
            if step == select + 2:
                mid = p.detach().clone()
        sched.remove()
        return factors, snapshot, taken, apart_collectives, mid, sched.log[0], sched.scale_values("lr")[0]

    return run_local(4, worker)


@pytest.mark.parametrize("use_probe", [True, False])
@pytest.mark.parametrize("grad_sync", [False, True])
def test_selection_start_runs_replicas_apart_then_all_take_the_best(use_probe, grad_sync):
    results = _select_run(grad_sync=grad_sync, use_probe=use_probe)
    factors = multipliers(4, 9.0, spacing="log")
    assert factors[2] == pytest.approx(10 ** (1 / 3), rel=1e-12)
    winner_p, winner_buf = results[2][1]
    for rank, (seen, snapshot, taken, apart, mid, entry, c) in enumerate(results):
        assert all(f == pytest.approx(factors[rank], rel=1e-12) for f in seen[:10])  # apart: c = 10^u_r
        assert apart == 0  # nothing sent while apart: no averaging, no gradient sync
        assert entry["selected"] == 2 and c == pytest.approx(factors[2], rel=1e-12)
        assert torch.equal(taken[0], winner_p) and torch.equal(taken[1], winner_buf)  # parameters and state
        assert all(f == pytest.approx(factors[2], rel=1e-12) for f in seen[10:])  # then c × the curve, ρ = 1
    mids = [r[4] for r in results]
    # with grad sync the replicas stay identical between converges; without it they drift apart again
    assert all(torch.equal(m, mids[0]) for m in mids) == grad_sync


SELECT_OPTIMIZERS = {
    # d lives in the param groups; Mechanic keeps its tuner in lists and AdamW's state in its base
    "prodigy": lambda params: optimizers.Prodigy(params, lr=1.0, weight_decay=0.01),
    "dadapt_adam": lambda params: optimizers.DAdaptAdam(params, lr=1.0),
    "mechanic": lambda params: optimizers.Mechanic(params, base_kwargs={"lr": 1e-2}),
}


@pytest.mark.parametrize("name", sorted(SELECT_OPTIMIZERS))
def test_selection_copies_state_kept_outside_the_state_tensors(name):
    # With grad sync, replicas that hold the same parameters and the same whole optimizer state
    # stay identical; a replica left with its own d (or tuner) drifts away at once.
    def worker(comm):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)).double()
        opt = SELECT_OPTIMIZERS[name](model.parameters())
        sched = HDET(opt, max_lr=opt.param_groups[0]["lr"], total_steps=16, spread=0.5, spacing="log",
                     converge_every=4, auto_lr_mode="scale", select_steps=6, auto_lr_stop=6, cycle_momentum=False,
                     grad_sync=True, comm=comm, seed=1)
        gen = torch.Generator().manual_seed(comm.rank)  # replicas see different data
        after_select = None
        for step in range(16):
            x = torch.randn(8, 4, generator=gen, dtype=torch.float64)
            loss = (model(x) - x.sum(1, keepdim=True)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step(float(comm.rank))  # rank 0 wins the selection
            if step == 5:
                after_select = io.BytesIO()
                torch.save(opt.state_dict(), after_select)
        sched.remove()
        return after_select.getvalue(), [p.detach().clone() for p in model.parameters()], opt.state_dict()

    results = run_local(3, worker)
    first_state = torch.load(io.BytesIO(results[0][0]), weights_only=False)
    for blob, params, _ in results[1:]:
        state = torch.load(io.BytesIO(blob), weights_only=False)
        assert _same_tree(state, first_state)
        assert all(torch.equal(p, q) for p, q in zip(params, results[0][1]))
    assert not _same_tree(results[0][2], first_state)  # it did step on after the selection


def _same_tree(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same_tree(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same_tree(x, y) for x, y in zip(a, b))
    return a == b


def test_selection_start_resumes_with_its_factor_and_gradient_sync():
    def worker(comm):
        def build():
            p = nn.Parameter(torch.zeros(2, dtype=torch.float64))
            opt = torch.optim.SGD([p], lr=0.1)
            return opt, HDET(opt, max_lr=0.1, total_steps=30, spread=0.5, spacing="log", converge_every=5,
                             auto_lr_mode="scale", select_steps=10, auto_lr_stop=10, cycle_momentum=False,
                             grad_sync=True, comm=comm, seed=1)

        opt, sched = build()
        assert sched._grad_sync is None  # not before the selection
        for step in range(12):
            opt.step(), sched.step(float(comm.rank))  # rank 0 reports the lowest loss
        state = sched.state_dict()
        sched.remove()
        opt2, again = build()
        again.load_state_dict(state)
        out = again._grad_sync is not None, again.scale_values("lr")[0], opt.param_groups[0]["lr"]
        again.remove()
        return out

    for hooked, c, lr in run_local(2, worker):
        assert hooked and c == pytest.approx(0.1, rel=1e-12) and lr > 0


def test_selection_start_arguments_are_checked():
    with pytest.raises(ValueError, match="select_steps"):
        HDET(_opt("sgd"), max_lr=0.1, total_steps=10, auto_lr_mode="scale", select_steps=10)
    with pytest.raises(ValueError, match="select_range"):
        HDET(_opt("sgd"), max_lr=0.1, total_steps=10, auto_lr_mode="scale", select_steps=5, select_range=1.0)
    with pytest.raises(ValueError, match="auto_lr_mode='select'"):
        HDET(_opt("sgd"), max_lr=0.1, total_steps=10, auto_lr_mode="additive", select_steps=5)
    with pytest.raises(ConfigError, match="algo.select_steps"):
        load(REPO / "configs/hdet.yaml", ["algo.auto_lr_mode=additive", "algo.select_steps=5"])
    with pytest.raises(ConfigError, match="algo.select_range"):
        load(REPO / "configs/hdet.yaml", ["algo.auto_lr_mode=scale", "algo.select_steps=5", "algo.select_range=0.5"])
