"""HDET over an outer algorithm (DiLoCo, NoLoCo): exactness when exploration is off, bytes, resume, the
selection grid with ×1, `algo=[hdet,diloco]`, and one real torchrun/gloo run."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from torch import nn

from dtrain.algorithms.diloco import DiLoCo
from dtrain.algorithms.hdet import HDET
from dtrain.algorithms.hdet_controller import round_range, selection_factors
from dtrain.algorithms.noloco import NoLoCo
from dtrain.comm.base import ring_allreduce_bytes
from dtrain.comm.local import run_local
from dtrain.config import ConfigError, load
from dist_utils import REPO

STEPS, H = 30, 5
SCORES = ring_allreduce_bytes(8 * 2 * 4, 4)  # one round's scores on 4 replicas: 2N float64s, one all-reduce
OUTERS = {"diloco": dict(outer_lr=0.5, outer_momentum=0.9), "noloco": dict(outer_lr=0.7, outer_momentum=0.5)}


def _model() -> nn.Module:
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    gen = torch.Generator().manual_seed(0)  # the same weights whatever thread builds it
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return model


def _train(comm, model, opt, sched, steps: range, *, hdet: bool) -> None:
    for step in steps:
        gen = torch.Generator().manual_seed(1000 * step + comm.rank)  # each replica its own batch
        x = torch.randn(8, 4, generator=gen)
        loss = (model(x) - x.sum(1, keepdim=True).sin()).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step(float(loss.detach())) if hdet else sched.step()


def _probe(model):
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(7))
    return lambda index: float((model(x) - x.sum(1, keepdim=True).sin()).pow(2).mean())


def _run(outer: str, hdet: dict | None, *, world: int = 4):
    """Final parameters and bytes sent per replica: OneCycleLR + the outer algorithm (hdet None), or HDET over it."""

    def worker(comm):
        model = _model()
        opt = torch.optim.AdamW(model.parameters(), lr=0.01)
        if hdet is None:
            algo = (DiLoCo(opt, comm, sync_every=H, **OUTERS[outer]) if outer == "diloco" else
                    NoLoCo(opt, comm, sync_every=H, seed=3, total_steps=STEPS, **OUTERS[outer]))
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.01, total_steps=STEPS, cycle_momentum=False)
        else:
            opts = dict(hdet)
            probe = _probe(model) if opts.pop("probe", False) else None
            sched = HDET(opt, 0.01, STEPS, comm=comm, seed=3, converge_every=H, cycle_momentum=False, outer=outer,
                         outer_options=OUTERS[outer], probe=probe, **opts)
        start = comm.stats.copy()
        _train(comm, model, opt, sched, range(STEPS), hdet=hdet is not None)
        sent = (comm.stats - start).bytes_sent
        comm.barrier()  # NoLoCo: let a late partner finish its last exchange
        report = sched.report() if hdet is not None else algo.report()
        return [p.detach().clone() for p in model.parameters()], sent, report

    return run_local(world, worker)


@pytest.mark.parametrize("outer", ["diloco", "noloco"])
def test_composition_without_exploring_is_the_outer_algorithm_bit_exact_and_adds_only_the_scores(outer):
    ref = _run(outer, None)
    off = _run(outer, dict(spread=0.0, auto_lr=False))
    steering = _run(outer, dict(spread=1.0, spacing="log", auto_lr_mode="scale", auto_lr_alpha=None,
                                auto_lr_warmup=H, probe=True))
    for (p_ref, bytes_ref, _), (p_off, bytes_off, rep), (p_steer, bytes_steer, rep2) in zip(ref, off, steering):
        assert all(torch.equal(a, b) for a, b in zip(p_ref, p_off))  # exploring off: the plain outer algorithm
        assert bytes_off == bytes_ref
        assert rep["outer"]["name"] == outer and rep["outer"]["outer_syncs"] == STEPS // H
        # exploring: the outer algorithm's bytes plus one small all-reduce of scores per outer step, nothing else
        assert bytes_steer == bytes_ref + (STEPS // H) * SCORES
        assert rep2["outer"]["outer_syncs"] == STEPS // H and rep2["lr_scale"] != [1.0]
        assert not all(torch.equal(a, b) for a, b in zip(p_ref, p_steer))


def test_selection_over_diloco_bytes_are_diloco_after_it_plus_the_winners_weights_and_scores():
    select = 10
    runs = _run("diloco", dict(auto_lr_mode="select", select_steps=select, select_grid="odd", probe=True))
    n_bytes = sum(p.numel() * 4 for p in _model().parameters())
    syncs = (STEPS - select) // H
    sent = [r[1] for r in runs]
    base = syncs * ring_allreduce_bytes(n_bytes, 4) + (2 + syncs) * SCORES  # selection: scores + state-finite flags
    assert sorted(sent) == sorted([base + 3 * n_bytes] + [base] * 3)  # the winner sends its weights to 3 others
    params = [r[0] for r in runs]
    assert all(torch.equal(a, b) for p in params[1:] for a, b in zip(p, params[0]))  # the last step is an outer step
    assert runs[0][2]["outer"]["start"] == select and runs[0][2]["outer"]["outer_syncs"] == syncs


@pytest.mark.parametrize("n", [3, 4, 5, 8])
def test_odd_grid_always_holds_x1_and_spans_the_range(n):
    f = selection_factors(n, 10.0, grid="odd")
    assert len(f) == n and 1.0 in f and min(f) == pytest.approx(0.1) and max(f) == pytest.approx(10.0)
    assert sorted(f) == f and all(x == pytest.approx(1 / y) for x, y in zip(f, reversed(f)))  # symmetric in log
    assert 1.0 not in selection_factors(4, 10.0, grid="even")  # the earlier grid: x1/10, x0.46, x2.15, x10
    assert round_range(10.0, 1) == pytest.approx(10**0.5)


def test_selection_keeps_x1_then_a_second_round_narrows_around_the_winner():
    """Round 1 (x1/10, x1, x1, x10) keeps x1 when the probe says it is best: c = 1 exactly, the lr is then
    OneCycleLR's to the last bit; round 2 (x1/√10 .. x√10 around it) moves to x√10 when that is best."""
    target = {"keep": 1.0, "move": 2.0}

    def worker(comm, case):
        p = nn.Parameter(torch.zeros(2, dtype=torch.float64))
        opt, ref_opt = torch.optim.SGD([p], lr=0.1), torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=0.1)
        ref = torch.optim.lr_scheduler.OneCycleLR(ref_opt, max_lr=0.1, total_steps=40, cycle_momentum=False)

        def probe(index):  # lowest for the factor closest to the target, ties to the lower rank
            return abs(math.log(sched.multiplier("lr") * sched.scale_values("lr")[0] / target[case])) + 1e-3 * comm.rank

        sched = HDET(opt, max_lr=0.1, total_steps=40, converge_every=5, cycle_momentum=False, auto_lr_mode="select",
                     select_steps=20, select_rounds=2 if case == "move" else 1, select_grid="odd", comm=comm, seed=1,
                     outer="diloco", probe=probe)
        lrs = []
        for step in range(40):
            lrs.append((opt.param_groups[0]["lr"], ref_opt.param_groups[0]["lr"]))
            p.grad = torch.ones_like(p)
            opt.step(), ref_opt.step()
            sched.step(1.0), ref.step()
        sched.remove()
        return lrs, sched.scale_values("lr")[0], [e["selected"] for e in sched.log if "selected" in e]

    for lrs, c, picks in run_local(4, lambda comm: worker(comm, "keep")):
        assert c == 1.0 and picks == [1] and all(a == b for a, b in lrs[20:])
    for lrs, c, picks in run_local(4, lambda comm: worker(comm, "move")):
        assert picks == [1, 3] and c == pytest.approx(10**0.5, rel=1e-12)  # round 2: x1/√10, x1, x1, x√10


@pytest.mark.parametrize("cut", [7, 17])  # apart in the selection (its solo outer steps), then over DiLoCo
def test_resume_mid_run_over_diloco_is_exact(cut):
    settings = dict(auto_lr_mode="select", select_steps=10, select_grid="odd", outer="diloco",
                    outer_options=OUTERS["diloco"], converge_every=H, cycle_momentum=False, seed=3)

    def worker(comm, cut):
        model = _model()
        opt = torch.optim.AdamW(model.parameters(), lr=0.01)
        sched = HDET(opt, 0.01, STEPS, comm=comm, probe=_probe(model), **settings)
        _train(comm, model, opt, sched, range(cut), hdet=True)
        if cut < STEPS:  # a restart: fresh objects, state loaded, the rest of the run
            saved = {"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}
            sched.remove()
            model = _model()
            opt = torch.optim.AdamW(model.parameters(), lr=0.01)
            sched = HDET(opt, 0.01, STEPS, comm=comm, probe=_probe(model), **settings)
            model.load_state_dict(saved["model"]), opt.load_state_dict(saved["opt"]), sched.load_state_dict(saved["sched"])
            _train(comm, model, opt, sched, range(cut, STEPS), hdet=True)
        return [p.detach().clone() for p in model.parameters()], sched.report()["outer"]["outer_syncs"]

    whole = run_local(4, lambda comm: worker(comm, STEPS))
    resumed = run_local(4, lambda comm: worker(comm, cut))
    for (a, syncs_a), (b, syncs_b) in zip(whole, resumed):
        assert all(torch.equal(x, y) for x, y in zip(a, b)) and syncs_a == syncs_b == (STEPS - 10) // H


def test_composition_keys_are_checked_with_one_line_naming_the_key():
    cfg = load(REPO / "configs/hdet.yaml", ["algo=[hdet,{name: diloco, outer_lr: 0.5}]"])
    assert (cfg.algo.name, cfg.algo.outer, dict(cfg.algo.outer_options)) == ("hdet", "diloco", {"outer_lr": 0.5})
    bad = {"algo.outer_options.sync_every": ["algo.outer=diloco", "algo.outer_options={sync_every: 3}"],
           "algo.grad_sync": ["algo.outer=diloco", "algo.grad_sync=true"],
           "algo.outer_options.outer_lr": ["algo.outer_options={outer_lr: 1.0}"],
           "'bogus'": ["algo.outer=diloco", "algo.outer_options={bogus: 1}"],
           "algo.outer_options.gamma": ["algo.outer=noloco", "algo.outer_options={gamma: 5.0}"],
           "algo.outer must": ["algo.outer=ddp"],
           "algo.select_grid": ["algo.select_grid=odd"]}  # no selection start: the key would do nothing
    for key, overrides in bad.items():
        with pytest.raises(ConfigError, match=key):
            load(REPO / "configs/hdet.yaml", overrides)
    def worker(comm):
        opt = torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=0.1)
        HDET(opt, 0.1, 40, comm=comm, outer="diloco", converge_every=5, auto_lr_mode="select", select_steps=7)

    with pytest.raises(ValueError, match="multiple of algo.converge_every"):
        run_local(2, worker)


@pytest.mark.timeout(240)
def test_torchrun_gloo_hdet_over_diloco_from_the_command_line(tmp_path):
    """Real processes: `dtrain train ... algo=[hdet,diloco]` under torchrun/gloo with a selection start:
    replicas identical at the end (an outer step), outer steps counted from the selection, bytes exact."""
    from dist_utils import train

    from dtrain.workloads.char_lm import GPT

    tiny = ["workload.n_layer=1", "workload.d_model=32", "workload.eval_batches=2", "threads=1"]
    summary = train(2, "configs/hdet.yaml", tmp_path / "run", "algo=[hdet,{name: diloco, outer_lr: 0.7}]", "steps=30",
                    "eval_every=30", "ckpt_every=0", "algo.converge_every=5", "algo.auto_lr_mode=select",
                    "algo.select_steps=10", "algo.probe_batches=1", "algo.auto_lr_warmup=5", *tiny)
    workers = summary["workers"]
    assert workers[0]["eval"]["val_loss"] == workers[1]["eval"]["val_loss"]
    outer = workers[0]["algorithm"]["outer"]
    assert (outer["name"], outer["start"], outer["outer_syncs"]) == ("diloco", 10, 4)
    n_bytes = 4 * sum(p.numel() for p in GPT(vocab=256, seq_len=64, n_layer=1, n_head=4, d_model=32).parameters())
    scores = ring_allreduce_bytes(8 * 2 * 2, 2)
    base = 4 * ring_allreduce_bytes(n_bytes, 2) + (2 + 4) * scores
    assert sorted(w["comm"]["bytes_sent"] for w in workers) == [base, base + n_bytes]  # + the winner's weights, once


@pytest.mark.timeout(420)  # ~15 s on an idle 2-core machine; a hang guard only
def test_benchmark_quick_runs_and_writes_its_table(tmp_path):
    from dist_utils import child_env

    out = tmp_path / "hdet.json"
    proc = subprocess.run([sys.executable, "benchmarks/hdet.py", "--quick", "--out", str(out)], cwd=REPO,
                          env=child_env(), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["label"]: r for r in json.loads(out.read_text())["rows"]}
    for outer in ("DiLoCo", "NoLoCo"):
        for start in ("10x high", "10x low", "best lr"):
            row = rows[f"HDET over {outer}, select odd, from {start}"]
            assert row["runs"][0]["selections"][0][2] == [0.1, 1.0, 1.0, 10.0]  # the odd grid, x1 on it
            assert math.isfinite(row["mean"]) and row["compute"] > 0.5  # 1 run of a 2-point quick sweep, + probes
    assert "HDET over DiLoCo" in out.with_suffix(".txt").read_text()
