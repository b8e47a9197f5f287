"""Streaming DiLoCo: DiLoCo bit for bit at P = 1, τ = 0, α = 0; the staggered schedule and its bytes;
garbage from a peer skipped; exact resume from a checkpoint taken with reductions in flight (a real
torchrun/gloo job with int4 + error feedback, resumed in a fresh process). Streaming NoLoCo: NoLoCo
bit for bit at P = 1, τ = 0, α = 0, exact resume with exchanges in flight. The benchmark's smoke run."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from dist_utils import REPO, child_env, train
from test_noloco import TINY, _train

from dtrain.algorithms.diloco import DiLoCo
from dtrain.algorithms.fragments import split_by_paths, split_even
from dtrain.algorithms.noloco import NoLoCo
from dtrain.algorithms.streaming import StreamingDiLoCo
from dtrain.algorithms.streaming_noloco import StreamingNoLoCo
from dtrain.comm.base import ring_allreduce_bytes
from dtrain.comm.local import run_local
from dtrain.testing.faults import FaultyComm


def _same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("codec", [{}, {"compression": "int4", "error_feedback": True}])
def test_one_fragment_no_overlap_no_mixing_is_diloco_bit_for_bit(codec):
    ref = run_local(3, lambda c: _train(c, lambda o, c: DiLoCo(o, c, sync_every=10, **codec)))
    got = run_local(3, lambda c: _train(c, lambda o, c: StreamingDiLoCo(o, c, sync_every=10, fragments=1, overlap_steps=0,
                                                                        mix_alpha=0.0, **codec)))
    for (a, d), (b, s) in zip(ref, got):
        assert _same(a, b)
        assert _same(d.outer_params, s.outer.phi)
        assert _same([d.outer_optimizer.state[x]["momentum_buffer"] for x in d.outer_params],
                     [s.outer_optimizers[0].state[x]["momentum_buffer"] for x in s.outer.views[0]])
        assert d.comm.stats.bytes_sent == s.comm.stats.bytes_sent and s.outer_syncs == d.outer_syncs == 4
    if codec:
        return
    # and the defaults (4 fragments, τ = 1, α = 0.5) are another algorithm: the test above could fail
    other = run_local(3, lambda c: _train(c, lambda o, c: StreamingDiLoCo(o, c, sync_every=8, fragments=4)))
    assert not _same(ref[0][0], other[0][0])


def _train_even(comm, make_algo, *, steps: int, hook=None):
    """Four equal 8x8 layers (four fragments of 72 values); each worker on its own data."""
    g = torch.Generator().manual_seed(1)
    model = torch.nn.Sequential(*[m for _ in range(4) for m in (torch.nn.Linear(8, 8), torch.nn.Tanh())][:-1])
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    algo = make_algo(opt, comm)
    data = torch.Generator().manual_seed(100 + comm.rank)
    for step in range(steps):
        hook(step)
        x = torch.randn(16, 8, generator=data)
        ((model(x) - x.flip(1).sin()) ** 2).mean().backward()
        opt.step()
        opt.zero_grad()
    return [p.detach().clone() for p in model.parameters()], algo


def test_fragments_are_staggered_and_peak_bytes_fall_by_p():
    h, p, n = 8, 4, 3
    trace: dict[int, list[int]] = {}

    def work(comm):
        sent: list[int] = []
        out = _train_even(comm, lambda o, c: StreamingDiLoCo(o, c, sync_every=h, fragments=p, overlap_steps=1,
                                                             broadcast_init=False),
                          steps=33, hook=lambda step: sent.append(comm.stats.bytes_sent))
        trace[comm.rank] = [b - a for a, b in zip(sent, sent[1:])]  # bytes sent by step 1..32
        return out

    got = run_local(n, work)
    algo = got[0][1]
    assert algo.report()["fragment_numel"] == [72] * 4
    assert [algo.due(t) for t in range(1, 9)] == [None, 1, None, 2, None, 3, None, 0]
    for t, sent in enumerate(trace[0], start=1):  # fragment q starts after step t ≡ q·H/P (mod H)
        assert sent == (ring_allreduce_bytes(4 * 72, n) if algo.due(t) is not None else 0), t
    diloco_round = ring_allreduce_bytes(4 * 288, n)  # what DiLoCo sends in its one sync step
    assert algo.peak_step_bytes == ring_allreduce_bytes(4 * 72, n) <= -(-diloco_round // p)
    assert algo.fragment_syncs == [4, 4, 4, 4]  # the start at 32 is applied at 33
    for params, _ in got[1:]:  # every replica mixes towards the same φ, but keeps α of its own θ
        assert not _same(params, got[0][0])
    for a, b in zip(got[0][1].outer.phi, got[1][1].outer.phi):
        assert torch.equal(a, b)  # the slow weights agree on every worker


def test_fragment_splits():
    def tensors(*sizes):
        return [torch.zeros(n) for n in sizes]

    assert split_even(tensors(128, 16, 16, 1), 2) == [[(0, 0, 80)], [(0, 80, 128), (1, 0, 16), (2, 0, 16), (3, 0, 1)]]
    assert split_even(tensors(10, 10, 10, 10), 4) == [[(0, 0, 10)], [(1, 0, 10)], [(2, 0, 10)], [(3, 0, 10)]]
    assert [sum(b - a for _, a, b in f) for f in split_even(tensors(7, 100, 3), 3)] == [37, 36, 37]
    with pytest.raises(ValueError, match="algo.fragments"):
        split_even(tensors(1, 1), 3)
    names = ["emb.weight", "h.0.w", "h.1.w", "head.weight"]
    assert split_by_paths(names, [5, 6, 7, 8], ["emb,head", "h"]) == [[(0, 0, 5), (3, 0, 8)], [(1, 0, 6), (2, 0, 7)]]
    with pytest.raises(ValueError, match="h.1.w"):
        split_by_paths(names, [5, 6, 7, 8], ["emb,head", "h.0"])


class _BadBytes(FaultyComm):
    """Sends NaN in the last four bytes of its last wire tensor: a compressed payload's last fp32 scale."""

    def _bad(self, tensors):
        out = [t.detach().clone() for t in tensors]
        out[-1].view(torch.uint8)[-4:] = torch.tensor([0, 0, 192, 127], dtype=torch.uint8)
        return out


@pytest.mark.parametrize("codec, comm_cls", [({"compression": "topk", "error_feedback": True, "topk_density": 0.25,
                                               "topk_chunk": 16}, _BadBytes),
                                              ({"compression": "bf16"}, FaultyComm)])
def test_garbage_from_a_peer_never_reaches_the_weights(codec, comm_cls):
    # Rank 1's calls 4..6 (after the broadcast: the starts at steps 12, 16, 20) carry NaN.
    def make(o, c):
        c = comm_cls(c, corrupt="nan", corrupt_from=4, corrupt_until=6) if c.rank == 1 else c
        return StreamingDiLoCo(o, c, sync_every=8, fragments=2, overlap_steps=2, **codec)

    got = run_local(3, lambda c: _train(c, make, steps=24))
    for params, algo in got:
        assert all(bool(torch.isfinite(p).all()) for p in params)
        assert algo.fragment_skips == [1, 2] and algo.fragment_syncs == [1, 1]  # the start at 24 is still in flight
        assert all(bool(torch.isfinite(phi).all()) for phi in algo.outer.phi)
        assert all(bool(torch.isfinite(e).all()) for e in algo.compressor.residuals.values())
    for a, b in zip(got[0][1].outer.phi, got[2][1].outer.phi):
        assert torch.equal(a, b)


def _ckpt(out, rank: int, step: int) -> dict:
    return torch.load(out / "checkpoints" / f"rank{rank}" / f"step_{step:08d}.pt", weights_only=True)


@pytest.mark.timeout(180)
def test_torchrun_int4_error_feedback_resumes_exactly_mid_overlap(tmp_path):
    from dtrain.config import load
    from dtrain.train import run

    common = [*TINY, "steps=16", "eval_every=16", "ckpt_every=10", "optim.schedule=constant", "optim.warmup_steps=0",
              "algo.sync_every=4", "algo.fragments=2", "algo.overlap_steps=3", "algo.compression=int4",
              "algo.error_feedback=true"]
    full = train(2, "configs/streaming_diloco.yaml", tmp_path / "full", *common)  # real processes over gloo
    rep = full["workers"][0]["algorithm"]
    assert rep["fragment_syncs"] == [4, 4] and rep["skipped_syncs"] == 0 and rep["compression"] == "int4"
    saved = _ckpt(tmp_path / "full", 0, 10)["algorithm"]
    assert sorted(saved["inflight"]) == [0, 1]  # both fragments' reductions were in flight at step 10
    assert saved["compressor"]["residuals"]  # error feedback carried something
    # Resume a copy from its step-10 checkpoint in a fresh process (two workers on the local backend:
    # a sum of two has one order, so its numbers are gloo's bit for bit).
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "full", resumed)
    for rank in range(2):
        (resumed / "checkpoints" / f"rank{rank}" / "step_00000016.pt").unlink()
    (resumed / "summary.json").unlink()
    torch.set_num_threads(1)
    run(load("configs/streaming_diloco.yaml", [*common, f"out_dir={resumed}", "resume=true", "comm.name=local",
                                               "comm.workers=2", "progress=false", "plot=false"]))
    for rank in range(2):
        a, b = _ckpt(tmp_path / "full", rank, 16), _ckpt(resumed, rank, 16)
        for k in a["model"]:
            assert torch.equal(a["model"][k], b["model"][k]), f"rank {rank} {k} differs after resume"
        assert _same(a["algorithm"]["outer_params"], b["algorithm"]["outer_params"])
        ra, rb = a["algorithm"]["compressor"]["residuals"], b["algorithm"]["compressor"]["residuals"]
        assert ra.keys() == rb.keys() and all(torch.equal(ra[k], rb[k]) for k in ra)


# -- Streaming NoLoCo ---------------------------------------------------------------------------------

@pytest.mark.parametrize("codec", [{}, {"compression": "topk", "error_feedback": True, "topk_density": 0.1}])
def test_streaming_noloco_one_fragment_no_overlap_is_noloco_bit_for_bit(codec):
    ref = run_local(4, lambda c: _train(c, lambda o, c: NoLoCo(o, c, sync_every=10, seed=3, **codec)))
    got = run_local(4, lambda c: _train(c, lambda o, c: StreamingNoLoCo(o, c, sync_every=10, seed=3, fragments=1,
                                                                        overlap_steps=0, mix_alpha=0.0, **codec)))
    for (a, n), (b, s) in zip(ref, got):
        assert _same(a, b) and _same(n.phi, s.phi[0]) and _same(n.momentum, s.momentum[0])
        assert s.outer_syncs == n.outer_syncs == 4 and s.member_failures == 0
    if codec:
        return
    other = run_local(4, lambda c: _train(c, lambda o, c: StreamingNoLoCo(o, c, sync_every=8, fragments=4, seed=3)))
    assert not _same(ref[0][0], other[0][0])  # P = 4 with the default τ = 1, α = 0.5 is another algorithm


def _build(comm):
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.5)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    algo = StreamingNoLoCo(opt, comm, sync_every=8, seed=5, fragments=2, overlap_steps=3, compression="int4",
                           error_feedback=True, broadcast_init=False, timeout_s=5.0)
    return model, opt, algo


def _steps(comm, model, opt, steps):
    for step in steps:  # the batch depends on (rank, step) only, so a resumed loop sees the same data
        x = torch.randn(16, 8, generator=torch.Generator().manual_seed(1000 * comm.rank + step))
        ((model(x) - x.sum(1, keepdim=True).sin()) ** 2).mean().backward()
        opt.step()
        opt.zero_grad()


def test_streaming_noloco_resumes_exactly_with_exchanges_in_flight():
    def full(comm):
        model, opt, algo = _build(comm)
        _steps(comm, model, opt, range(30))
        return [p.detach().clone() for p in model.parameters()], algo

    def resumed(comm):
        model, opt, algo = _build(comm)
        _steps(comm, model, opt, range(13))  # fragment 1 started at step 12 is in flight until 15
        saved = {"model": model.state_dict(), "opt": opt.state_dict(), "algo": algo.state_dict()}
        assert sorted(saved["algo"]["inflight"]) == [1]
        algo.remove()
        model, opt, algo = _build(comm)  # a fresh worker: loads, and posts the exchange again
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"])
        algo.load_state_dict(saved["algo"])
        _steps(comm, model, opt, range(13, 30))
        return [p.detach().clone() for p in model.parameters()], algo

    ref, got = run_local(2, full), run_local(2, resumed)
    for (a, x), (b, y) in zip(ref, got):
        assert _same(a, b) and x.outer_syncs == y.outer_syncs == 6 and y.member_failures == 0  # 28 + τ > 30
        assert all(_same(u, v) for u, v in zip(x.phi, y.phi))


@pytest.mark.timeout(120)
def test_benchmark_quick_runs_and_writes_its_table(tmp_path):
    out = tmp_path / "streaming.json"
    proc = subprocess.run([sys.executable, "benchmarks/streaming.py", "--quick", "--out", str(out)], cwd=REPO,
                          env=child_env(), capture_output=True, text=True, timeout=110)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["label"]: r for r in json.loads(out.read_text())["local_mean"]}
    assert rows["streaming P4 tau2"]["peak_vs_diloco"] <= 0.251  # one fragment of four on the wire per step
    assert rows["diloco topk3%+EF"]["bytes_x_fewer"] > 20 and rows["diloco int4"]["bytes_x_fewer"] > 5
    assert "goals:" in out.with_suffix(".txt").read_text()
