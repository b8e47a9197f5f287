"""Robust aggregation: the math against numpy and by hand, Comm.all_gather on every backend's base
path, and a peer sending finite values x1000 to DDP, DiLoCo and NoLoCo (local threads and torchrun)."""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest
import torch
from dist_utils import torchrun

from dtrain.algorithms import ddp, diloco, noloco
from dtrain.algorithms.ddp import DDP
from dtrain.algorithms.diloco import DiLoCo
from dtrain.algorithms.noloco import NoLoCo
from dtrain.algorithms.robust import Options, Tracker, aggregate, clip_rows, median, trimmed_mean
from dtrain.comm.base import BadPeerData
from dtrain.comm.local import run_local
from dtrain.config import ConfigError, load
from dtrain.testing.faults import FaultyComm

# -- the math -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [3, 4, 5, 8])
def test_median_and_trimmed_mean_match_numpy(n):
    rows = torch.randn(n, 50, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    np.testing.assert_allclose(median(rows).numpy(), np.median(rows.numpy(), axis=0), rtol=0, atol=1e-15)
    k = math.floor(0.25 * n)
    ordered = np.sort(rows.numpy(), axis=0)
    np.testing.assert_allclose(trimmed_mean(rows, 0.25).numpy(), ordered[k : n - k].mean(0), rtol=0, atol=1e-15)


def test_trimmed_mean_by_hand():
    rows = torch.tensor([[1.0, -5.0], [2.0, 0.0], [3.0, 1.0], [100.0, 2.0]])
    # k = 1: column 0 keeps {2, 3}, column 1 keeps {0, 1}
    assert trimmed_mean(rows, 0.25).tolist() == [2.5, 0.5]
    assert trimmed_mean(rows, 1 / 3).tolist() == [2.5, 0.5]  # floor(4/3) = 1
    assert median(rows).tolist() == [2.5, 0.5]
    assert median(rows[:3]).tolist() == [2.0, 0.0]


def test_norm_bound_clips_to_the_reference_and_names_the_row():
    rows = torch.tensor([[3.0, 4.0], [0.0, 1.0], [30.0, 40.0]])  # norms 5, 1, 50
    clipped, idx = clip_rows(rows, 10.0)
    assert idx == [2]
    torch.testing.assert_close(clipped, torch.tensor([[3.0, 4.0], [0.0, 1.0], [6.0, 8.0]]))
    # reference None: the median norm (5), bound 2 x 5 = 10, then a plain mean
    res = aggregate(rows, Options(norm_bound=2.0))
    assert res.clipped == [2]
    torch.testing.assert_close(res.value, torch.tensor([9.0 / 3, 13.0 / 3]))
    # own-norm reference (NoLoCo): row 0's norm 5 x 1.5 = 7.5
    res = aggregate(rows, Options(norm_bound=1.5), reference=5.0)
    assert res.clipped == [2]
    torch.testing.assert_close(res.value[0], torch.tensor((3.0 + 0.0 + 4.5) / 3))


def test_outlier_is_named_and_logged_a_bounded_number_of_times(caplog):
    rows = torch.cat([torch.randn(3, 20, generator=torch.Generator().manual_seed(0)), 1000 * torch.ones(1, 20)])
    res = aggregate(rows, Options(mode="median"))
    assert res.outliers == [3]
    tracker = Tracker("diloco", Options(mode="median"))
    with caplog.at_level(logging.WARNING, logger="dtrain.algorithms.robust"):
        for _ in range(5):
            tracker.round(res, [0, 1, 2, 7], rank=0, where="outer step 1")
    assert tracker.report()["outliers"] == {7: 5}
    assert len([r for r in caplog.records if "peer 7" in r.getMessage()]) == 3  # 1st, 2nd, 4th


def test_config_keys_are_validated_with_one_line_each():
    cases = {
        "algo.robust=mean": "algo.robust must be one of",
        "algo.robust_trim=0.5": "algo.robust_trim must be in",
        "algo.robust_trim=0.3": "only applies to algo.robust=trimmed_mean",
        "algo.robust_norm_bound=0.5": "algo.robust_norm_bound must be 0",
        "algo.robust_norm_bound=.inf": "algo.robust_norm_bound must be 0",
        "algo.robust_trim=0": "algo.robust_trim must be in",
    }
    for name in ("ddp", "diloco", "noloco"):
        for override, message in cases.items():
            with pytest.raises(ConfigError, match=message):
                load(f"configs/{name}.yaml", [override])
    with pytest.raises(ConfigError, match="use algo.robust_norm_bound"):
        load("configs/noloco.yaml", ["algo.robust=median"])  # pairs
    with pytest.raises(ConfigError, match="trims nobody among 3"):
        load("configs/noloco.yaml", ["algo.robust=trimmed_mean", "algo.group_size=3"])
    for module in (ddp, diloco, noloco):  # and the valid forms pass
        module.validate(module.Config(robust="trimmed_mean", robust_trim=0.3, robust_norm_bound=2.0, **(
            {"group_size": 4} if module is noloco else {})))


# -- Comm.all_gather ------------------------------------------------------------------------------------


def test_all_gather_sends_raw_bytes_and_validates_what_arrives():
    def worker(comm):
        mine = [torch.full((2, 3), float(comm.rank)), torch.arange(4.0) + comm.rank]
        got = comm.all_gather(mine)
        sent = comm.stats.bytes_sent
        return [[t.clone() for t in entry] for entry in got], sent

    for rank, (got, sent) in enumerate(run_local(3, worker)):
        assert sent == 2 * 10 * 4  # 10 fp32 values to each of the 2 others, counted by all_gather_bytes
        for r, entry in enumerate(got):
            assert torch.equal(entry[0], torch.full((2, 3), float(r))) and torch.equal(entry[1], torch.arange(4.0) + r)

    def bad(comm):
        wrapped = FaultyComm(comm, corrupt="shape") if comm.rank == 1 else comm
        x = [torch.ones(5)]
        if comm.rank == 1:  # it sees every other payload as too short: the same two calls, skipping
            wrapped.all_gather(x, skip_bad=True)
            return wrapped.all_gather(x, skip_bad=True)
        with pytest.raises(BadPeerData, match="peer 1 sent bad data: 24 bytes, expected 20"):
            wrapped.all_gather(x)
        return wrapped.all_gather(x, skip_bad=True)

    results = run_local(3, bad)
    assert results[0][1] == [] and results[2][1] == [] and len(results[0][0]) == 1

    def nan(comm):
        wrapped = FaultyComm(comm, corrupt="nan") if comm.rank == 2 else comm
        return wrapped.all_gather([torch.ones(4)], skip_bad=True), wrapped.all_gather([torch.ones(4)], finite=False)

    kept, raw = run_local(3, nan)[0]
    assert kept[2] == [] and bool(torch.isnan(raw[2][0]).any())


@pytest.mark.timeout(120)
def test_all_gather_over_hivemind_peers(tmp_path):
    pytest.importorskip("hivemind")
    from test_hivemind import on_all, start_group

    comms = start_group(3, tmp_path, "gather")
    try:
        def gather(c):
            mine = [torch.full((3,), 1.0 / 3 + c.rank, dtype=torch.bfloat16), torch.full((2,), -1.0 * c.rank, dtype=torch.bfloat16)]
            return [[t.clone() for t in entry] for entry in c.all_gather(mine)]

        for got in on_all(comms, gather):
            for r, (a, b) in enumerate(got):  # raw bytes: bf16 values arrive exactly
                assert torch.equal(a, torch.full((3,), 1.0 / 3 + r, dtype=torch.bfloat16))
                assert torch.equal(b, torch.full((2,), -1.0 * r, dtype=torch.bfloat16))
    finally:
        for c in comms:
            c.close()


# -- one peer sends finite values x1000 -----------------------------------------------------------------


def _model() -> torch.nn.Module:
    g = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model


def _run(make_algo, *, attacked: bool, steps: int = 20, workers: int = 4):
    """Each worker's final parameters and algorithm; rank 3 scales what it sends by 1000 (after setup)."""
    def worker(comm):
        if attacked and comm.rank == 3:
            comm = FaultyComm(comm, corrupt="scale", scale=1000.0, corrupt_from=2)
        model = _model()
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        algo = make_algo(opt, comm)
        g = torch.Generator().manual_seed(100 + comm.rank)
        for _ in range(steps):
            x = torch.randn(16, 8, generator=g)
            ((model(x) - x.sum(1, keepdim=True).sin()) ** 2).mean().backward()
            opt.step()
            opt.zero_grad()
        return torch.cat([p.detach().reshape(-1) for p in model.parameters()]), algo

    return run_local(workers, worker)


START = torch.cat([p.detach().reshape(-1) for p in _model().parameters()])

ALGOS = {
    "ddp": lambda **kw: (lambda o, c: DDP(o, c, **kw)),
    "diloco": lambda **kw: (lambda o, c: DiLoCo(o, c, sync_every=5, **kw)),
    "noloco-pairs": lambda **kw: (lambda o, c: NoLoCo(o, c, sync_every=5, **kw)),
    "noloco-group4": lambda **kw: (lambda o, c: NoLoCo(o, c, sync_every=5, group_size=4, **kw)),
}
ROBUST = {
    "ddp": [{"robust": "trimmed_mean"}, {"robust": "median"}, {"robust_norm_bound": 2.0}],
    "diloco": [{"robust": "trimmed_mean"}, {"robust": "median"}, {"robust_norm_bound": 2.0}],
    "noloco-pairs": [{"robust_norm_bound": 2.0}],
    "noloco-group4": [{"robust": "median"}, {"robust": "trimmed_mean"}],
}


_X = torch.randn(512, 8, generator=torch.Generator().manual_seed(999))


def _heldout_loss(flat: torch.Tensor) -> float:
    model = _model()
    torch.nn.utils.vector_to_parameters(flat, model.parameters())
    with torch.no_grad():
        return float(((model(_X) - _X.sum(1, keepdim=True).sin()) ** 2).mean())


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", list(ALGOS))
def test_scaling_peer_ruins_the_mean_and_robust_aggregation_holds(name):
    torch.set_num_threads(1)
    make = ALGOS[name]
    honest = _run(make(), attacked=False)
    honest_loss = max(_heldout_loss(w) for w, _ in honest[:3])
    assert honest_loss < 0.6 * _heldout_loss(START)  # the honest run learns
    plain = _run(make(), attacked=True)
    ruined = max(_heldout_loss(w) for w, _ in plain[:3])
    assert not math.isfinite(ruined) or ruined > 100 * honest_loss, ruined
    for kw in ROBUST[name]:
        got = _run(make(**kw), attacked=True)
        loss = max(_heldout_loss(w) for w, _ in got[:3])
        far = max(float((w - ref).norm() / (ref - START).norm()) for (w, _), (ref, _) in zip(got[:3], honest[:3]))
        assert loss < 1.1 * honest_loss and far < 0.75, (kw, loss, honest_loss, far)
        # the bad peer is named by every honest worker that met it, and no honest peer is
        named = [r for _, algo in got[:3] for kind in ("clipped", "outliers") for r in algo.report()["robust"][kind]]
        assert set(named) == {3}, (kw, [algo.report()["robust"] for _, algo in got])


TINY = ["workload.n_layer=1", "workload.d_model=32", "workload.n_head=2", "workload.seq_len=32",
        "workload.batch_size=8", "workload.eval_batches=2", "workload.eval_batch_size=8", "threads=1",
        "steps=8", "eval_every=8", "ckpt_every=0", "algo.sync_every=2", "progress=false", "plot=false"]


@pytest.mark.timeout(300)
def test_torchrun_diloco_median_refuses_a_scaling_peer(tmp_path):
    from dtrain.train import run

    # the honest reference: the same three workers on the local backend, plain mean
    honest = run(load("configs/diloco.yaml", [*TINY, f"out_dir={tmp_path / 'honest'}", "comm.name=local", "comm.workers=3"]))
    out = tmp_path / "attacked"
    # rank 2 multiplies its model-sized messages (its outer Δ) by 1000
    proc = torchrun(3, ["-m", "dtrain.testing.faults", "--corrupt", "scale", "--scale", "1000", "--only-rank", "2",
                        "--corrupt-min-numel", "100", "--", "configs/diloco.yaml", f"out_dir={out}", "algo.robust=median",
                        *TINY], timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval"]["value"] == pytest.approx(honest["eval"]["value"], rel=0.05)
    assert abs(summary["eval"]["value"] - summary["eval"]["initial"]) > 1e-3  # it trained
    for worker in summary["workers"]:
        assert worker["algorithm"]["robust"]["outliers"] == {"2": 4}  # every outer step, on every worker (JSON keys)
    assert "peer 2 sent a contribution far from the robust mean" in proc.stderr
