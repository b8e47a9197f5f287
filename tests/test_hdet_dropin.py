"""HDET as a OneCycleLR drop-in: exact with one replica, within its spread of the curve until the
significance test passes, one Config for the library and `dtrain train`, exact resume through the loop."""

from __future__ import annotations

import dataclasses
import math
import shutil
import subprocess
import sys

import pytest
import torch
from torch import nn

from dtrain import checkpoint, config
from dtrain.algorithms.base import AttachContext
from dtrain.algorithms.hdet import HDET, REPLACES, Config, attach
from dtrain.algorithms.hdet_controller import BETS, bet_wealth, evidence_passes
from dtrain.comm.local import run_local
from dtrain.config import ConfigError, load
from dist_utils import REPO


def _opt(kind: str, groups: int = 1) -> torch.optim.Optimizer:
    params = [{"params": [nn.Parameter(torch.zeros(3))]} for _ in range(groups)]
    if kind == "sgd":
        return torch.optim.SGD(params, lr=0.1, momentum=0.9)
    return torch.optim.AdamW(params, lr=0.1, betas=(0.9, 0.99), weight_decay=0.01)


def _state(opt: torch.optim.Optimizer) -> list[tuple]:
    return [(g["lr"], g["betas"][0] if "betas" in g else g["momentum"]) for g in opt.param_groups]


ARGUMENT_SETS = [
    ("sgd", 1, dict(max_lr=0.1, total_steps=60)),  # every other argument at torch's default
    ("adamw", 1, dict(max_lr=0.02, epochs=4, steps_per_epoch=9, pct_start=0.2, anneal_strategy="linear")),
    ("sgd", 2, dict(max_lr=[0.1, 0.02], total_steps=45, three_phase=True, div_factor=5.0, final_div_factor=50.0,
                    base_momentum=[0.8, 0.7], max_momentum=[0.9, 0.95])),
    ("adamw", 2, dict(max_lr=0.004, total_steps=33, cycle_momentum=False, pct_start=0.5)),
]


@pytest.mark.parametrize("kind,groups,kwargs", ARGUMENT_SETS)
@pytest.mark.parametrize("resume_at", [None, 11])
def test_no_comm_is_onecycle_to_the_bit_for_every_argument(kind, groups, kwargs, resume_at):
    """comm=None, default options: lr and momentum equal torch's at every step; last_epoch too."""
    total = kwargs.get("total_steps") or kwargs["epochs"] * kwargs["steps_per_epoch"]
    ref_opt, our_opt = _opt(kind, groups), _opt(kind, groups)
    ref = torch.optim.lr_scheduler.OneCycleLR(ref_opt, **kwargs)
    ours = HDET(our_opt, **kwargs)
    first = 0
    if resume_at is not None:  # a scheduler rebuilt mid-run from the groups' anchors, as torch resumes
        for _ in range(resume_at):
            ref_opt.step(), our_opt.step(), ref.step(), ours.step()
        ref = torch.optim.lr_scheduler.OneCycleLR(ref_opt, **kwargs, last_epoch=resume_at)
        ours = HDET(our_opt, **kwargs, last_epoch=resume_at)
        first = resume_at + 1
    for step in range(first, total):
        assert _state(our_opt) == _state(ref_opt), step
        assert ours.get_last_lr() == ref.get_last_lr(), step
        ref_opt.step(), our_opt.step()
        ref.step(), ours.step(0.5)


def test_one_replica_comm_is_onecycle_too():
    def worker(comm):
        ref_opt, our_opt = _opt("adamw"), _opt("adamw")
        ref = torch.optim.lr_scheduler.OneCycleLR(ref_opt, max_lr=0.01, total_steps=40)
        ours = HDET(our_opt, max_lr=0.01, total_steps=40, comm=comm, converge_every=3)
        for step in range(40):
            assert _state(our_opt) == _state(ref_opt), step
            ref_opt.step(), our_opt.step(), ref.step(), ours.step(float(step))
        return ours.converges

    assert run_local(1, worker) == [13]


# -- one Config: library and `dtrain train` --------------------------------------------------------------
def _ctx(opt: torch.optim.Optimizer, comm, total: int, lr: float) -> AttachContext:
    return AttachContext(model=nn.Linear(1, 1), optimizer=opt, comm=comm, seed=0, total_steps=total, lr=lr)


RESOLVED = ("total_steps", "replicas", "spread", "converge_every", "mode", "spacing", "auto_lr", "auto_lr_warmup",
            "beta", "sigma", "gain", "alpha", "window", "auto_lr_stop", "select_steps", "per_group", "reshuffle",
            "average_optimizer_state", "cycle_momentum", "rho", "_select_rho", "_wants_grad_sync", "probe")


def test_library_and_config_defaults_are_one_algorithm():
    """HDET(opt, max_lr, total_steps, comm) and `dtrain train` with algo.name=hdet: every Config field,
    every resolved setting and, on 3 replicas fed the same losses, the same lr at every step."""
    algo = load(None, ["algo.name=hdet"]).algo
    total = 250  # 10 converge rounds at the default converge_every=25: enough for the test to pass

    def worker(comm):
        lib_opt, cfg_opt = _opt("adamw"), _opt("adamw")
        lib = HDET(lib_opt, max_lr=0.01, total_steps=total, comm=comm)
        via_config = attach(algo, _ctx(cfg_opt, comm, total, 0.01))
        sched = via_config.scheduler
        assert via_config.algorithm is sched  # what the loop checkpoints is the scheduler itself
        assert dataclasses.asdict(lib.cfg) == dataclasses.asdict(sched.cfg) == dataclasses.asdict(Config())
        assert all(getattr(lib, k) == getattr(sched, k) for k in RESOLVED)
        lrs = []
        for step in range(total):
            lrs.append((lib_opt.param_groups[0]["lr"], cfg_opt.param_groups[0]["lr"]))
            lib_opt.step(), cfg_opt.step()
            loss = 1.0 - 0.05 * lib.multiplier("lr")  # a signal, so the controller acts in both
            lib.step(loss), sched.step(loss)
        return lrs, lib.scale_values("lr")

    for lrs, scale in run_local(3, worker):
        assert all(a == b for a, b in lrs)
        assert scale != [1.0]  # the signal passed the test: the comparison covers the controller's moves


def test_options_merge_cfg_overrides_and_onecycle_arguments():
    base = Config(spread=0.2, pct_start=0.2)
    sched = HDET(_opt("sgd"), 0.1, 20, None, None, 0.4, cfg=base, converge_every=5)
    assert (sched.cfg.spread, sched.cfg.pct_start, sched.cfg.converge_every) == (0.2, 0.4, 5)
    assert base.pct_start == 0.2  # the caller's cfg is not changed
    with pytest.raises(TypeError, match="'spred'"):
        HDET(_opt("sgd"), max_lr=0.1, total_steps=10, spred=0.5)
    with pytest.raises(ValueError, match="probe=fn"):
        HDET(_opt("sgd"), max_lr=0.1, total_steps=10, probe_batches=1)  # only `dtrain train` can build that probe


def test_select_steps_without_auto_lr_is_an_error_not_a_silent_zero():
    with pytest.raises(ValueError, match="auto_lr=true"):
        HDET(_opt("sgd"), max_lr=0.1, total_steps=20, auto_lr=False, select_steps=5)
    with pytest.raises(ConfigError, match="algo.select_steps needs algo.auto_lr"):
        load(REPO / "configs/hdet.yaml", ["algo.auto_lr=false", "algo.auto_lr_mode=select"])
    with pytest.raises(ValueError, match="2\\+ replicas"):  # one replica: nothing to select from
        HDET(_opt("sgd"), max_lr=0.1, total_steps=20, auto_lr_mode="select")
    with pytest.raises(ValueError, match="reshuffle"):  # a fixed deal gives the test nothing to test against
        HDET(_opt("sgd"), max_lr=0.1, total_steps=20, reshuffle=False)


def test_select_mode_is_the_selection_start_in_one_switch():
    def worker(comm):
        opt = _opt("sgd")
        sched = HDET(opt, max_lr=0.1, total_steps=50, cycle_momentum=False, auto_lr_mode="select", comm=comm)
        for _ in range(50):
            opt.step(), sched.step(float(comm.rank == 1))  # replica 1 scores worst, the others tie: 0 wins
        return sched.select_steps, sched.auto_lr_stop, sched.log[0]["selected"], sched.scale_values("lr")[0]

    for select, stop, winner, c in run_local(2, worker):
        assert (select, stop, winner) == (5, 5, 0) and c == pytest.approx(0.1, rel=1e-12)  # x1/10 won


def test_replaces_names_the_optim_keys_hdet_makes_meaningless():
    assert REPLACES == {"optim": ("schedule", "warmup_steps", "min_lr_ratio")}
    fields = {f.name for f in dataclasses.fields(config.OptimConfig)}
    assert all(key in fields for keys in REPLACES.values() for key in keys)
    load(REPO / "configs/hdet.yaml")  # the example sets none of them
    for key, value in (("schedule", "constant"), ("warmup_steps", 5), ("min_lr_ratio", 0.5)):
        with pytest.raises(ConfigError, match=f"optim.{key} is ignored under algo.name=hdet"):
            load(REPO / "configs/hdet.yaml", [f"optim.{key}={value}"])


# -- never below the curve's spread before evidence ---------------------------------------------------
def _onecycle_lrs(total: int, **kwargs) -> list[float]:
    opt = _opt("sgd")
    ref = torch.optim.lr_scheduler.OneCycleLR(opt, total_steps=total, **kwargs)
    out = []
    for _ in range(total):
        out.append(opt.param_groups[0]["lr"])
        opt.step(), ref.step()
    return out


def _default_run(loss_of, total: int = 200):
    """3 replicas, HDET's defaults; ``loss_of(rank, step, multiplier)`` is what each feeds to step()."""

    def worker(comm):
        opt = _opt("sgd")
        sched = HDET(opt, max_lr=0.1, total_steps=total, comm=comm)
        lrs, scales = [], []
        for step in range(total):
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step(loss_of(comm.rank, step, sched.multiplier("lr")))
            scales.append((sched.scale_values("lr")[0], sched.evidence("lr")[0]))
        return lrs, scales, sched

    return run_local(3, worker)


def _within_spread(lrs: list[float], ref: list[float], spread: float) -> bool:
    return all((1 - spread) * r * (1 - 1e-12) <= x <= (1 + spread) * r * (1 + 1e-12) for x, r in zip(lrs, ref))


@pytest.mark.parametrize("losses", ["equal", "noise"])
def test_defaults_stay_within_the_spread_of_onecycle_when_losses_say_nothing(losses):
    def noise(rank, step, rho):  # independent of the multiplier
        return 1.0 + 0.1 * float(torch.randn(1, generator=torch.Generator().manual_seed(7919 * step + rank)))

    loss_of = (lambda rank, step, rho: 1.0 / (1 + step)) if losses == "equal" else noise
    ref = _onecycle_lrs(200, max_lr=0.1)
    for lrs, scales, sched in _default_run(loss_of):
        assert _within_spread(lrs, ref, sched.spread)
        assert all(c == 1.0 for c, _ in scales) and not any(e["moved"] for e in sched.log)
        assert sched.converges == 8 and len(sched.log) == 8  # the controller looked at every round (from 10%)


def test_defaults_on_a_real_toy_run_stay_within_the_spread_until_the_test_passes():
    """The reported bug: right after the warm-up the additive controller cut the lr 10-100x below
    OneCycleLR. With the defaults every replica's lr stays in [1 - a, 1 + a] x OneCycle's until the
    rounds pass the test, and only then may c move."""
    total, w_true = 120, torch.tensor([1.0, -2.0, 0.5, 3.0])

    def worker(comm):
        model = nn.Linear(4, 1)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        sched = HDET(opt, max_lr=0.05, total_steps=total, comm=comm, converge_every=5)
        lrs, wealth = [], []
        for step in range(total):
            gen = torch.Generator().manual_seed(1000 * comm.rank + step)
            x = torch.randn(8, 4, generator=gen)
            loss = ((model(x).squeeze(-1) - x @ w_true) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step(loss)
            wealth.append(sched.evidence("lr")[0])
        return lrs, wealth, sched

    ref = _onecycle_lrs(total, max_lr=0.05)
    for lrs, wealth, sched in run_local(3, worker):
        opened = next((s + 1 for s, w in enumerate(wealth) if w >= 1 / 0.05), total)
        assert opened >= 15 + 6 * 5  # 7 test rounds at least: the first counts at step 15 (after 10%, a random deal)
        assert _within_spread(lrs[:opened], ref[:opened], sched.spread)


def test_the_controller_moves_only_once_consistent_rounds_pass_the_test():
    ref = _onecycle_lrs(300, max_lr=0.1)
    results = _default_run(lambda rank, step, rho: 1.0 - 0.1 * rho, total=300)  # the higher multiplier always wins
    for lrs, scales, sched in results:
        assert [r[1] for r in results][0] == scales  # every replica computes the same c and evidence
        opened = next(s for s, (_, w) in enumerate(scales) if w >= 20)
        assert all(c == 1.0 for c, _ in scales[:opened]) and scales[opened][0] > 1.0
        assert _within_spread(lrs[:opened + 1], ref[:opened + 1], sched.spread)
        rounds = [e for e in sched.log if e["step"] <= opened + 1]
        assert len(rounds) == 7 and opened + 1 == 200  # from the warm-up (30 steps) on: the 7 rounds the test needs
        assert scales[-1][0] > scales[opened][0]


def test_the_gate_opens_on_noise_with_at_most_its_level_however_long_the_run():
    """Under the null every round's sign is a fair coin; the chance the wealth ever reaches 1/α in a
    run of 300 rounds must be <= α (Ville's inequality; here much less)."""
    gen = torch.Generator().manual_seed(0)
    runs, rounds, alpha = 2000, 300, 0.05
    signs = torch.randint(0, 2, (runs, rounds), generator=gen)
    up = signs.cumsum(1)
    down = torch.arange(1, rounds + 1) - up
    wealth = sum((1 + lam) ** up.double() * (1 - lam) ** down.double() for lam in BETS) / len(BETS)
    opened = (wealth >= 1 / alpha).any(1).double().mean().item()
    assert opened <= alpha
    assert math.isclose(float(wealth[0, 9]), bet_wealth(int(up[0, 9]), int(down[0, 9])), rel_tol=1e-12)
    assert not evidence_passes(6, 0, alpha) and evidence_passes(7, 0, alpha) and evidence_passes(3, 9, None)


# -- the loop: what it checkpoints is the scheduler's real state --------------------------------------
def _toy_cfg(out, *extra):
    config.register_workload("toy", "toy_workload")
    return load(None, ["workload.name=toy", "algo.name=hdet", "comm.name=local", "comm.workers=2", f"out_dir={out}",
                       "progress=false", "plot=false", "optim.name=sgd", "optim.lr=0.05", "optim.weight_decay=0",
                       "steps=20", "eval_every=20", "ckpt_every=7", "algo.converge_every=5", "algo.auto_lr_warmup=5",
                       "algo.probe_batches=1", "algo.auto_lr_alpha=null",
                       "algo.auto_lr_sigma=1000", *extra])  # a wide softmax: c follows every digit of the probe


def test_resume_mid_interval_through_the_config_path_is_bit_identical(tmp_path):
    from dtrain.train import run

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run(_toy_cfg(straight))
    shutil.copytree(straight, resumed)
    for rank in (0, 1):  # as if killed after step 14: mid-interval, the probe's running mean half full
        (checkpoint.rank_dir(resumed, rank) / "step_00000020.pt").unlink()
    summary = run(_toy_cfg(resumed, "resume=true"))
    assert summary["workers"][0]["resumed_from"] == 14
    for rank in (0, 1):
        a, b = checkpoint.load(straight, rank, 20), checkpoint.load(resumed, rank, 20)
        assert a["algorithm"]["last_epoch"] == 20 and a["algorithm"]["iterates"] is not None
        for part in ("model", "optimizer", "scheduler", "algorithm"):
            assert _same(a[part], b[part]), (rank, part)
        assert a["algorithm"]["log"][-1]["scale"] != {"lr": [1.0]}  # the controller did move: state that matters


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.timeout(240)
def test_dropin_benchmark_quick_runs_and_writes_its_table(tmp_path):
    out = tmp_path / "dropin.json"
    proc = subprocess.run([sys.executable, "benchmarks/hdet_dropin.py", "--quick", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=230)
    assert proc.returncode == 0, proc.stderr[-2000:]
    import json

    data = json.loads(out.read_text())
    assert {r["system"] for r in data["rows"]} == {"HDET defaults", "OneCycleLR (exploration off)"}
    assert all(len(r["val_loss"]) == 2 and all(math.isfinite(x) for x in r["val_loss"]) for r in data["rows"])
    assert "mean" in out.with_suffix(".txt").read_text()
