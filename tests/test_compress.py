"""Compressed outer updates: bytes on the wire equal each codec's payload formula (any rank, bf16 too),
error feedback conserves the signal, the codecs' levels, and malformed payloads refused."""

from __future__ import annotations

import math

import pytest
import torch

from dtrain.algorithms.compress import Codec, DecodeError
from dtrain.algorithms.diloco import DiLoCo
from dtrain.algorithms.outer_reduce import Compressor
from dtrain.comm.local import run_local

N = 3  # workers


def _ring(nbytes: int) -> int:
    return math.ceil(2 * (N - 1) * nbytes / N)


def _expected_round_bytes(codec: dict, numel: int, itemsize: int) -> int:
    """The payload formula, written out here independently of dtrain.algorithms.compress."""
    name = codec.get("compression", "none")
    if name == "none":
        return _ring(numel * itemsize)
    if name == "bf16":
        return _ring(2 * numel)
    blocks = -(-numel // 64)
    if name == "int8":
        wire = blocks * 64 + 4 * blocks
    elif name == "int4":
        wire = -(-blocks * 64 // 2) + 4 * blocks
    else:
        length = min(codec.get("topk_chunk", 4096), numel)
        chunks = -(-numel // length)
        k = math.ceil(codec.get("topk_density", 0.03) * length - 1e-9)
        ib, vb = math.ceil(math.log2(length)), codec.get("topk_value_bits", 2)
        wire = -(-chunks * k * ib // 8) + -(-chunks * k * vb // 8) + 4 * chunks
    return (N - 1) * wire  # all-gathered: this worker's payload to each of the others


CODECS = [{}, {"compression": "bf16"}, {"compression": "int8"}, {"compression": "int4", "error_feedback": True},
          {"compression": "topk", "error_feedback": True},
          {"compression": "topk", "topk_density": 0.1, "topk_chunk": 12, "topk_value_bits": 4}]
SHAPES = [((37,), torch.float32), ((5, 13), torch.float32), ((2, 3, 4, 5), torch.float32), ((7, 11), torch.bfloat16)]


def _one_tensor_run(comm, shape, dtype, codec, rounds=2, record=None):
    param = torch.nn.Parameter(torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dtype))
    target = torch.randn(shape, generator=torch.Generator().manual_seed(1 + comm.rank)).to(dtype)
    opt = torch.optim.SGD([param], lr=0.1)
    algo = DiLoCo(opt, comm, sync_every=2, broadcast_init=False, **codec)
    if record is not None:
        encode = algo.compressor.encode
        algo.compressor.encode = lambda key, flat: record(comm.rank, flat.clone(), encode(key, flat))
    for _ in range(2 * rounds):
        ((param - target) ** 2).sum().backward()
        opt.step()
        opt.zero_grad()
    return comm.stats.bytes_sent, param.detach().clone(), algo


@pytest.mark.parametrize("codec", CODECS, ids=lambda c: "-".join(f"{v}" for v in c.values()) or "none")
def test_bytes_per_round_equal_the_payload_formula(codec):
    for shape, dtype in SHAPES:
        got = run_local(N, lambda c: _one_tensor_run(c, shape, dtype, codec))
        numel = math.prod(shape)
        for sent, param, algo in got:
            assert sent == 2 * _expected_round_bytes(codec, numel, torch.empty(0, dtype=dtype).element_size()), (shape, dtype)
            assert param.dtype == dtype and bool(torch.isfinite(param).all()) and algo.outer_syncs == 2
        assert all(torch.equal(got[0][1], p) for _, p, _ in got)  # every worker applied the same mean


@pytest.mark.parametrize("codec", [{"compression": "topk", "topk_density": 0.1, "topk_chunk": 16},
                                   {"compression": "int4"}, {"compression": "bf16"}], ids=lambda c: c["compression"])
def test_error_feedback_conserves_the_signal_in_float64(codec):
    sent: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {r: [] for r in range(N)}

    def record(rank, flat, wire):
        sent[rank].append((flat, wire.clone()))  # a summable wire is reduced in place later
        return wire

    got = run_local(N, lambda c: _one_tensor_run(c, (5, 13), torch.float64, {**codec, "error_feedback": True},
                                                 rounds=8, record=record))
    c = Codec(codec["compression"], density=codec.get("topk_density", 0.03), chunk=codec.get("topk_chunk", 4096))
    for rank, (_, _, algo) in enumerate(got):
        assert len(sent[rank]) == 8
        true = sum(flat for flat, _ in sent[rank])
        delivered = sum(c.decode(wire, 65).double() for _, wire in sent[rank])
        residual = algo.compressor.residuals["delta/0"]
        assert residual.dtype == torch.float64 and float(residual.abs().max()) > 1e-3  # something was held back
        torch.testing.assert_close(delivered + residual, true, rtol=0, atol=1e-6)


def test_a_skipped_round_gives_its_signal_back():
    comp = Compressor(Codec("topk", density=0.1, chunk=16), error_feedback=True)
    g = torch.Generator().manual_seed(0)
    deltas = [torch.randn(40, generator=g, dtype=torch.float64) for _ in range(3)]
    applied = []
    for r, d in enumerate(deltas):
        wire = comp.encode("k", d)
        if r == 1:
            comp.rollback("k")  # every worker skipped this outer step: nothing of it was delivered
        else:
            comp.settle("k")
            applied.append(comp.codec.decode(wire, 40).double())
    torch.testing.assert_close(sum(applied) + comp.residuals["k"], sum(deltas), rtol=0, atol=1e-9)
    comp.encode("k", torch.full((40,), float("nan"), dtype=torch.float64))
    assert bool(torch.isfinite(comp.residuals["k"]).all())  # a NaN Δ never enters the residual


def test_error_feedback_decay_follows_its_recurrence():
    """β < 1: u_r = Δ_r + β·e_{r−1}, e_r = u_r − D(C(u_r)), checked against the recurrence written out."""
    beta, codec = 0.75, Codec("topk", density=0.1, chunk=16)
    comp = Compressor(codec, error_feedback=True, decay=beta)
    g = torch.Generator().manual_seed(1)
    e = torch.zeros(40, dtype=torch.float64)
    for _ in range(4):
        d = torch.randn(40, generator=g, dtype=torch.float64)
        wire = comp.encode("k", d)
        comp.settle("k")
        u = d + beta * e
        assert torch.equal(wire, codec.encode(u))
        e = u - codec.decode(codec.encode(u), 40).double()
        torch.testing.assert_close(comp.residuals["k"], e, rtol=0, atol=0)
    assert float(e.abs().sum()) > 0

def test_codec_levels_and_kept_values():
    x = torch.tensor([1.0, 0.75, 0.74, 0.5, 0.2, 1 / 64, 1 / 128, 1 / 129, -1.0, 0.0])
    assert Codec("int4", block=10).roundtrip(x).tolist() == [1, 1, 0.5, 0.5, 0.25, 1 / 64, 1 / 64, 0, -1, 0]
    g = torch.Generator().manual_seed(3)
    y = torch.randn(1000, generator=g)
    back = Codec("int4").roundtrip(y)
    big = y.abs() >= y.abs().max() / 32  # above every block's smallest level: within a third of the value
    assert bool(((back - y).abs()[big] <= y.abs()[big] / 3 + 1e-7).all())
    topk = Codec("topk", density=0.1, chunk=100, value_bits=4)
    back = topk.roundtrip(y)
    for chunk, got in zip(y.view(10, 100), back.view(10, 100)):
        kept = set(chunk.abs().topk(10).indices.tolist())
        assert set(got.nonzero().flatten().tolist()) == kept  # exactly the 10 largest of each chunk
        assert bool((got[list(kept)].sign() == chunk[list(kept)].sign()).all())
    assert float((Codec("int8").roundtrip(y) - y).abs().max()) <= float(y.abs().max()) / 254 + 1e-7


@pytest.mark.parametrize("name, kw, corrupt, why", [
    ("int8", {}, lambda w: w[:-1], "payload of"),
    ("int4", {}, lambda w: torch.cat([w[:-4], torch.tensor([0, 0, 128, 255], dtype=torch.uint8)]), "scales"),  # -inf
    ("int4", {}, lambda w: torch.cat([w[:-4], torch.tensor([0, 0, 128, 191], dtype=torch.uint8)]), "scales"),  # -1.0
    ("topk", {"chunk": 12, "density": 0.25}, lambda w: torch.cat([w[:1] | 0xF, w[1:]]), "index outside"),
    ("bf16", {}, lambda w: torch.full_like(w, float("nan")), "non-finite"),
    ("topk", {}, lambda w: w.to(torch.int8), "payload of"),
])
def test_malformed_payloads_are_refused(name, kw, corrupt, why):
    codec = Codec(name, **kw)
    x = torch.randn(24, generator=torch.Generator().manual_seed(1))
    codec.decode(codec.encode(x), 24)  # the real payload decodes
    with pytest.raises(DecodeError, match=why):
        codec.decode(corrupt(codec.encode(x)), 24)


@pytest.mark.parametrize("name", ["none", "bf16", "int4"])
def test_a_reduction_in_flight_saves_what_this_worker_sent(name):
    """A checkpoint taken mid-overlap holds our own payload, never a partly or fully reduced one."""
    from dtrain.algorithms.outer_reduce import resume_mean, start_mean

    def work(comm):
        mine = [torch.full((70,), float(comm.rank + 1))]
        pending = start_mean(comm, Compressor(Codec(name)), [t.clone() for t in mine], "k")
        saved = pending.state_dict()
        pending.wait_into()
        again = resume_mean(comm, Codec(name), saved, [torch.zeros(70)])
        again.wait_into()
        return saved["wires"][0], pending.targets[0], again.targets[0]

    for rank, (sent, mean, resumed) in enumerate(run_local(2, work)):
        torch.testing.assert_close(Codec(name).decode(sent, 70).float(), torch.full((70,), float(rank + 1)))
        assert torch.equal(mean, torch.full((70,), 1.5)) and torch.equal(resumed, mean)


def _ddp_run(comm, shape, dtype, codec, *, steps=2, nan_at=None):
    from dtrain.algorithms.ddp import DDP

    param = torch.nn.Parameter(torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dtype))
    target = torch.randn(shape, generator=torch.Generator().manual_seed(1 + comm.rank)).to(dtype)
    opt = torch.optim.SGD([param], lr=0.1)
    algo = DDP(opt, comm, broadcast_init=False, **codec)
    before = []
    for step in range(steps):
        ((param - target) ** 2).sum().backward()
        if nan_at == (step, comm.rank):
            param.grad.view(-1)[0] = float("nan")
        before.append(param.detach().clone())
        opt.step()
        opt.zero_grad()
    return comm.stats.bytes_sent, param.detach().clone(), algo, before


@pytest.mark.parametrize("codec", [CODECS[1], CODECS[4]], ids=lambda c: "-".join(f"{v}" for v in c.values()))
def test_ddp_compressed_gradient_bytes_and_identical_replicas(codec):
    """DDP's compressed gradient: the wire bytes per step are the codec's payload formula, for any rank and
    bf16, and every worker applies the same mean (replicas stay bit-identical)."""
    for shape, dtype in SHAPES:
        got = run_local(N, lambda c: _ddp_run(c, shape, dtype, codec))
        numel = math.prod(shape)
        for sent, param, algo, _ in got:
            assert sent == 2 * _expected_round_bytes(codec, numel, torch.empty(0, dtype=dtype).element_size()), (shape, dtype)
            assert param.dtype == dtype and algo.skipped_steps == 0
        assert all(torch.equal(got[0][1], p) for _, p, _, _ in got)


def test_ddp_compressed_nan_from_one_worker_is_skipped_by_all_and_error_feedback_keeps_its_signal():
    codec = {"compression": "topk", "topk_density": 0.1, "topk_chunk": 16, "error_feedback": True}
    got = run_local(N, lambda c: _ddp_run(c, (5, 13), torch.float32, codec, steps=3, nan_at=(1, 2)))
    for _, param, algo, before in got:
        assert algo.skipped_steps == 1 and bool(torch.isfinite(param).all())
        assert algo.compressor.resets == 0 and all(bool(torch.isfinite(e).all()) for e in algo.compressor.residuals.values())
    assert all(torch.equal(got[0][1], p) for _, p, _, _ in got)
    for *_, before in got:  # the skipped step (1) left the weights as they were; the others moved them
        assert torch.equal(before[1], before[2]) and not torch.equal(before[0], before[1])
