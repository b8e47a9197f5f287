"""NoLoCo: DiLoCo equivalence at n = N, a valid shared matching, no collectives, odd N, silent or
slow partners, compressed exchange, exact resume under torchrun."""

from __future__ import annotations

import json
import re
import textwrap
import time
from pathlib import Path

import pytest
import torch
from dist_utils import torchrun, train

from dtrain.algorithms.diloco import DiLoCo
from dtrain.algorithms.noloco import Config, NoLoCo, groups_for_round, validate
from dtrain.algorithms.compress import decode, encode, wire_numel
from dtrain.comm.local import run_local

TINY = ["workload.n_layer=1", "workload.d_model=32", "workload.n_head=2", "workload.seq_len=32",
        "workload.batch_size=8", "workload.eval_batches=2", "workload.eval_batch_size=8", "threads=1"]


def _model() -> torch.nn.Module:
    g = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model


def _train(comm, make_algo, *, steps: int = 40, hook=None):
    """A small regression per worker, each on its own data; returns (params, algorithm)."""
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    algo = make_algo(opt, comm)
    g = torch.Generator().manual_seed(100 + comm.rank)
    for step in range(steps):
        if hook is not None and hook(comm.rank, step):
            break
        x = torch.randn(16, 8, generator=g)
        loss = ((model(x) - x.sum(1, keepdim=True).sin()) ** 2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    return [p.detach().clone() for p in model.parameters()], algo


def test_group_of_all_equals_diloco_outer_sgd():
    n = 4
    ref = run_local(n, lambda c: _train(c, lambda o, c: DiLoCo(o, c, sync_every=10, outer_lr=0.7, outer_momentum=0.5, nesterov=False)))
    got = run_local(n, lambda c: _train(c, lambda o, c: NoLoCo(o, c, sync_every=10, outer_lr=0.7, outer_momentum=0.5, group_size=n)))
    for (a, _), (b, algo) in zip(ref, got):
        assert algo.outer_syncs == 4
        for x, y in zip(a, b):
            torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-6)
    # and with pairs it is a different algorithm (the test above could not pass by accident)
    pairs = run_local(n, lambda c: _train(c, lambda o, c: NoLoCo(o, c, sync_every=10, group_size=2)))
    assert max(float((x - y).abs().max()) for x, y in zip(ref[0][0], pairs[0][0])) > 1e-3


def test_nesterov_group_of_all_equals_diloco():
    """nesterov=true with n = N is DiLoCo's own outer step (Nesterov SGD), and differs from the heavy-ball form."""
    n = 4
    ref = run_local(n, lambda c: _train(c, lambda o, c: DiLoCo(o, c, sync_every=10, outer_lr=0.7, outer_momentum=0.9)))
    got = run_local(n, lambda c: _train(c, lambda o, c: NoLoCo(o, c, sync_every=10, outer_lr=0.7, outer_momentum=0.9,
                                                               nesterov=True, group_size=n)))
    heavy = run_local(n, lambda c: _train(c, lambda o, c: NoLoCo(o, c, sync_every=10, outer_lr=0.7, outer_momentum=0.9,
                                                                 group_size=n)))
    for (a, _), (b, algo) in zip(ref, got):
        assert algo.outer_syncs == 4
        for x, y in zip(a, b):
            torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-6)
    assert max(float((x - y).abs().max()) for x, y in zip(ref[0][0], heavy[0][0])) > 1e-3


@pytest.mark.parametrize("overrides, needs", [
    ({"nesterov": True, "outer_momentum": 0.9, "gamma": 1.4}, "0, 1.357"),  # 2(1 + 0.9)/(1 + 1.8)
    ({"nesterov": True, "outer_momentum": 0.0, "gamma": 0.5}, "outer_momentum > 0"),
])
def test_nesterov_pair_stability_range_is_checked(overrides, needs):
    with pytest.raises(ValueError, match=re.escape(needs)):
        Config(**overrides).validate()
    Config(nesterov=True, outer_momentum=0.9, gamma=0.7).validate()  # inside (0, 1.357): the paper's form refuses it
    with pytest.raises(ValueError, match="stability range"):
        Config(outer_momentum=0.9, gamma=0.7).validate()


def test_phi_sent_ahead_changes_timing_not_results():
    def make(lead):
        return lambda o, c: NoLoCo(o, c, sync_every=10, phi_lead_steps=lead, total_steps=30, broadcast_init=False)

    runs = [run_local(4, lambda c, lead=lead: _train(c, make(lead), steps=30)) for lead in (-1, 0, 3)]
    for other in runs[1:]:
        for (a, _), (b, _) in zip(runs[0], other):
            assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert runs[0][0][1].comm.stats.messages == 2 * 3  # φ and Δ apart: two messages a round
    assert runs[1][0][1].comm.stats.messages == 3  # φ with Δ: one


@pytest.mark.parametrize("group_size", [2, 3])
def test_groups_are_a_matching_shared_by_all_workers(group_size):
    for world in range(1, 10):
        seen = set()
        for round_ in range(1, 30):
            groups = groups_for_round(range(world), round_, seed=7, group_size=group_size)
            flat = sorted(r for g in groups for r in g)
            assert flat == list(range(world))  # everyone in exactly one group
            if world >= 2:
                assert all(2 <= len(g) <= group_size + 1 for g in groups)  # nobody left alone
                assert sum(len(g) != group_size for g in groups) <= 1 or len(groups) == 1
            seen.add(tuple(map(tuple, groups)))
            assert groups == groups_for_round(list(reversed(range(world))), round_, seed=7, group_size=group_size)
        if world >= 2 * group_size:
            assert len(seen) > 5  # the matching changes between rounds
    # what the workers actually did: each one met the same group as every member of that group
    results = run_local(5, lambda c: _train(c, lambda o, c: NoLoCo(o, c, sync_every=5, seed=3), steps=30))
    logs = [dict((r, tuple(g)) for r, g in algo.group_log) for _, algo in results]
    for r in range(1, 7):
        for w in range(5):
            assert w in logs[w][r] and all(logs[j][r] == logs[w][r] for j in logs[w][r])
        assert sorted(logs[w][r] for w in range(5)) != [tuple(range(5))] * 5  # pairs and a triple, not one group


def test_silent_and_slow_partners_are_skipped_not_waited_for():
    timeout = 0.3

    def hook(rank: int, step: int) -> bool:
        if rank == 3 and step == 20:
            return True  # rank 3 falls silent after its second outer step
        if rank == 1 and step == 9:
            time.sleep(3 * timeout)  # rank 1 is late for its first outer step
        return False

    start = time.perf_counter()
    results = run_local(4, lambda c: _train(c, lambda o, c: NoLoCo(o, c, sync_every=10, timeout_s=timeout), steps=60, hook=hook))
    elapsed = time.perf_counter() - start
    algos = [a for _, a in results]
    assert sum(a.member_failures for a in algos) >= 1 + 3  # rank 1's round-1 partner, then whoever meets rank 3
    assert elapsed < 30
    for params, algo in results[:3]:
        assert algo.outer_syncs == 6
        assert all(bool(torch.isfinite(p).all()) for p in params)
    partner_of_1 = next(j for j in algos[1].group_log[0][1] if j != 1)
    assert algos[partner_of_1].member_failures >= 1


def test_bad_data_from_a_partner_skips_the_round():
    class Garbage(NoLoCo):
        def _wire(self, flats, kind):
            wires = super()._wire(flats, kind)  # one wire tensor per dtype group
            if self.comm.rank == 1:
                wires[-1][-4:] = torch.tensor([0, 0, -64, -1], dtype=torch.int8)  # last block's fp32 scale := NaN
            return wires

    results = run_local(2, lambda c: _train(c, lambda o, c: Garbage(o, c, sync_every=10, compression="int8"), steps=20))
    assert results[0][1].member_failures == 2 and results[0][1].solo_rounds == 2
    assert results[1][1].member_failures == 0
    assert all(bool(torch.isfinite(p).all()) for p in results[0][0])


def test_compressed_wire_sizes_and_error():
    x = torch.randn(10_000, generator=torch.Generator().manual_seed(0)) * 0.01
    q8 = encode(x, "int8", block=64)
    assert q8.dtype == torch.int8 and q8.numel() == wire_numel(x.numel(), "int8", 64)
    assert q8.numel() * q8.element_size() <= 0.3 * x.numel() * 4
    back = decode(q8, x.numel(), "int8", block=64)
    assert float((back - x).norm() / x.norm()) < 0.02
    assert float((back - x).abs().max()) <= float(x.abs().max()) / 254 + 1e-9
    bf = decode(encode(x, "bf16"), x.numel(), "bf16")
    assert 0 < float((bf - x).norm() / x.norm()) < 2**-8
    results = run_local(2, lambda c: _train(c, lambda o, c: NoLoCo(o, c, sync_every=10, compression="int8"), steps=20))
    rep = results[0][1].report()
    assert 0 < rep["wire_rel_error_delta"] < 0.02 and 0 < rep["wire_rel_error_phi"] < 0.02
    assert rep["member_failures"] == 0


def test_config_validation_names_the_key():
    validate(Config())
    with pytest.raises(ValueError, match="algo.gamma"):
        validate(Config(outer_momentum=0.9))  # γ = β = 0.7 < α: outside the n = 2 stability range
    validate(Config(outer_momentum=0.9, gamma=1.0))
    validate(Config(outer_momentum=0.9, group_size=4))  # no condition known for n > 2
    with pytest.raises(ValueError, match="algo.compression"):
        validate(Config(compression="fp8"))


def _ckpt(out: Path, rank: int, step: int) -> dict:
    return torch.load(out / "checkpoints" / f"rank{rank}" / f"step_{step:08d}.pt", weights_only=True)


def test_train_loop_group_of_all_matches_diloco(tmp_path):
    from dtrain.config import load
    from dtrain.train import run

    common = [*TINY, "steps=30", "eval_every=30", "ckpt_every=30", "optim.schedule=constant", "optim.warmup_steps=0",
              "comm.name=local", "comm.workers=3", "progress=false", "plot=false", "algo.sync_every=10"]
    run(load("configs/diloco.yaml", [*common, f"out_dir={tmp_path / 'd'}", "algo.outer_lr=0.7",
                                     "algo.outer_momentum=0.5", "algo.nesterov=false"]))
    s = run(load("configs/noloco.yaml", [*common, f"out_dir={tmp_path / 'n'}", "algo.group_size=3"]))
    assert s["comm"]["max"]["collectives"] == 0
    for rank in range(3):
        ref, got = _ckpt(tmp_path / "d", rank, 30)["model"], _ckpt(tmp_path / "n", rank, 30)["model"]
        for k in ref:
            torch.testing.assert_close(got[k], ref[k], rtol=1e-4, atol=1e-5)  # Adam amplifies last-bit differences


@pytest.mark.timeout(420)
def test_torchrun_no_collectives_and_exact_resume(tmp_path):
    common = [*TINY, "eval_every=20", "ckpt_every=20", "optim.schedule=constant", "optim.warmup_steps=0",
              "algo.sync_every=5"]
    full = train(3, "configs/noloco.yaml", tmp_path / "full", *common, "steps=40")
    assert full["workers_reporting"] == 3
    assert full["comm"]["max"]["collectives"] == 0  # no all-reduce, broadcast or barrier while training
    assert full["comm"]["max"]["messages"] == 2 * 2 * 8  # φ and Δ to each of 2 others, 8 rounds
    logs = [dict((r, tuple(g)) for r, g in w["algorithm"]["groups"]) for w in sorted(full["workers"], key=lambda w: w["rank"])]
    assert all(logs[w][r] == (0, 1, 2) for w in range(3) for r in range(1, 9))  # odd N = 3: one group of three
    train(3, "configs/noloco.yaml", tmp_path / "resumed", *common, "steps=20")
    train(3, "configs/noloco.yaml", tmp_path / "resumed", *common, "steps=40", "resume=true")
    for rank in range(3):
        a, b = _ckpt(tmp_path / "full", rank, 40), _ckpt(tmp_path / "resumed", rank, 40)
        for k in a["model"]:
            assert torch.equal(a["model"][k], b["model"][k]), f"rank {rank} {k} differs after resume"
        for key in ("phi", "momentum"):  # one flat vector per dtype group
            assert all(torch.equal(x, y) for x, y in zip(a["algorithm"][key], b["algorithm"][key], strict=True))


SLOW_WORKER = textwrap.dedent("""
    import os, sys, time, json, torch
    from dtrain.comm.torch_backend import TorchComm
    from dtrain.algorithms.noloco import NoLoCo
    comm = TorchComm(backend="gloo", timeout_s=60)
    model = torch.nn.Linear(64, 64)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    algo = NoLoCo(opt, comm, sync_every=5, timeout_s=0.5, compression=sys.argv[1], total_steps=40)
    t0 = time.perf_counter()
    for step in range(40):
        if comm.rank == 2 and step == 12:
            time.sleep(5.0)  # late for round 3 by far more than the timeout
        model(torch.randn(4, 64)).square().mean().backward()
        opt.step(); opt.zero_grad()
    rep = algo.report()
    rep["finite"] = all(bool(torch.isfinite(p).all()) for p in model.parameters())
    rep["collectives"] = comm.stats.collectives
    comm.barrier()  # like dtrain train's final gather: the late worker's last exchanges complete first
    open(f"{sys.argv[2]}/r{comm.rank}.json", "w").write(json.dumps(rep))
    comm.close()
""")


@pytest.mark.timeout(300)
def test_torchrun_slow_partner_times_out_and_training_goes_on(tmp_path):
    script = tmp_path / "slow.py"
    script.write_text(SLOW_WORKER)
    proc = torchrun(4, [str(script), "bf16", str(tmp_path)], timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reports = {r: json.loads((tmp_path / f"r{r}.json").read_text()) for r in range(4) if (tmp_path / f"r{r}.json").exists()}
    assert sorted(reports) == [0, 1, 2, 3]
    assert all(r["finite"] and r["outer_syncs"] == 8 and r["collectives"] == 1 for r in reports.values())  # 1 = broadcast_init
    # its partners gave up on it after the timeout instead of waiting out the sleep ...
    assert sum(r["member_failures"] for r in reports.values() if r is not reports[2]) >= 2
    assert max(r["phi_wait_s"] + r["delta_wait_s"] for r in reports.values()) < 5.0
    # ... while the late worker found its partners' messages waiting (1 spare for a loaded machine)
    assert reports[2]["member_failures"] <= 1
