"""The Comm interface on the local (threads) and torch (gloo processes) backends."""

import json

import pytest
import torch
from dist_utils import torchrun

from dtrain.comm import BadPeerData, PeerTimeout, run_local
from dtrain.comm.base import CommStats, ring_allreduce_bytes


def test_local_collectives_and_counters():
    def work(comm):
        t = [torch.full((4,), float(comm.rank)), torch.full((2,), 10.0 * comm.rank)]
        comm.all_reduce(t, op="mean")
        s = [torch.tensor([float(comm.rank + 1)])]
        comm.all_reduce(s, op="sum")
        b = [torch.full((3,), float(comm.rank))]
        comm.broadcast(b, src=2)
        g = comm.all_gather_bytes(bytes([comm.rank]))
        comm.barrier()
        return t[0][0].item(), t[1][0].item(), s[0].item(), b[0].tolist(), g, comm.stats.as_dict()

    results = run_local(4, work)
    for mean0, mean1, total, bcast, gathered, stats in results:
        assert mean0 == pytest.approx(1.5) and mean1 == pytest.approx(15.0)
        assert total == 10.0
        assert bcast == [2.0, 2.0, 2.0]
        assert gathered == [b"\x00", b"\x01", b"\x02", b"\x03"]
        assert stats["collectives"] == 5
    # ring model: 2(N-1)/N of a 6-float buffer, plus a 1-float one
    assert results[0][5]["payload_bytes"] == 6 * 4 + 4 + 0 + 1  # rank 0 is not the broadcast source
    assert results[2][5]["bytes_sent"] == ring_allreduce_bytes(24, 4) + ring_allreduce_bytes(4, 4) + 3 * 12 + 3


def test_local_reductions_are_identical_on_every_worker():
    def work(comm):
        g = torch.Generator().manual_seed(comm.rank)
        t = torch.randn(1000, generator=g)
        comm.all_reduce([t], op="mean")
        return t

    out = run_local(3, work)
    assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])


def test_local_exchange_timeout_and_validation():
    def work(comm):
        if comm.rank == 0:
            got = comm.exchange([torch.arange(3.0)], 1, tag=1)
            with pytest.raises(PeerTimeout):
                comm.exchange([torch.ones(2)], 1, tag=2, timeout=0.2)  # rank 1 never answers tag 2
            with pytest.raises(BadPeerData, match="non-finite"):
                comm.exchange([torch.ones(2)], 1, tag=3)
            return got[0].tolist(), comm.stats
        got = comm.exchange([torch.arange(3.0) * 2], 0, tag=1)
        comm.exchange([torch.tensor([1.0, float("inf")])], 0, tag=3)
        return got[0].tolist(), comm.stats

    (got0, s0), (got1, s1) = run_local(2, work)
    assert got0 == [0.0, 2.0, 4.0] and got1 == [0.0, 1.0, 2.0]
    assert s0.collectives == 0 and s0.messages == 3
    assert s0.bytes_recv == 12 + 0 + 0  # the timed-out and the rejected replies are not counted as received
    assert s0.blocked_s >= 0.2


def test_stats_subtraction_and_bad_inputs():
    a = CommStats(bytes_sent=10, collectives=2, blocked_s=1.5)
    b = CommStats(bytes_sent=4, collectives=1, blocked_s=0.5)
    assert (a - b).as_dict() == CommStats(bytes_sent=6, collectives=1, blocked_s=1.0).as_dict()

    def work(comm):
        with pytest.raises(ValueError, match="op must be one of"):
            comm.all_reduce([torch.ones(1)], op="avg")
        with pytest.raises(ValueError, match="needs at least one tensor"):
            comm.all_gather([])
        with pytest.raises(TypeError, match="bytes"):
            comm.all_gather_bytes("text")
        return True

    assert run_local(1, work) == [True]


@pytest.mark.timeout(120)
def test_torch_backend_over_gloo(tmp_path):
    out = tmp_path / "ops"
    proc = torchrun(4, ["tests/scripts/comm_ops.py", str(out)], timeout=100)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = [json.loads((tmp_path / f"ops.{r}").read_text()) for r in range(4)]
    for r, x in enumerate(res):
        assert x["mean"] == [[1.5] * 3, [2.5] * 4]
        assert x["max"] == 3.0
        assert x["bcast"] == [1.0] * 5
        assert x["gather"] == [f"hi{i}" * (i + 1) for i in range(4)]
        assert x["exchange"] == [float(r ^ 1), -float(r ^ 1)]
        eb = x["exchange_bytes"]
        assert eb["bytes_sent"] == eb["bytes_recv"] == 12 * 4 and eb["messages"] == 1 and eb["collectives"] == 0
        assert x["nan_rejected"] == (r == 1)  # only rank 1 received rank 0's NaNs
        assert x["threads_left"] == []  # failure watcher and exchange threads joined by close()
    assert res[0]["timeout"] is True
    assert res[1]["late_reply_delivered"] is True  # rank 0's send survived its own timeout
    # 3 all-reduces, 1 broadcast, 1 all-gather, 1 barrier
    assert all(x["stats"]["collectives"] == 6 for x in res)
