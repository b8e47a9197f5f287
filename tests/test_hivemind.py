"""The hivemind backend's Comm on real peers (threads of this process, real p2pd daemons)."""

from __future__ import annotations

import asyncio
import json
import math
import os
import subprocess
import threading
import time
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("hivemind")

from dtrain.comm.base import BadPeerData, PeerTimeout  # noqa: E402
from dtrain.comm.hivemind import Config, HivemindComm, validate  # noqa: E402
from dtrain.comm.hivemind.join import decode_state, encode_state  # noqa: E402
from dtrain.comm.hivemind.membership import Membership  # noqa: E402
from dtrain.comm.hivemind.wire import WireError, decode_tensor, pack, tensor_bytes, tensor_header, unpack  # noqa: E402
from dtrain.testing.faults import FaultyComm  # noqa: E402


def start_group(n: int, tmp_path, run_id: str, *, heartbeat: float = 0.3) -> list[HivemindComm]:
    comms: list[HivemindComm | None] = [None] * n
    maddr = tmp_path / f"{run_id}.maddr"
    knobs = dict(run_id=run_id, min_peers=n, request_timeout=1.0, matchmaking_time=5.0, heartbeat=heartbeat)

    def first() -> None:
        comms[0] = HivemindComm(Config(rank=0, maddr_file=str(maddr), **knobs))

    threads = [threading.Thread(target=first)]
    threads[0].start()
    while not (maddr.exists() and maddr.read_text().strip()):
        time.sleep(0.05)
    addr = maddr.read_text().split()[0]

    def other(i: int) -> None:
        comms[i] = HivemindComm(Config(initial_peers=[addr], **knobs))  # rank claimed from the DHT

    threads += [threading.Thread(target=other, args=(i,)) for i in range(1, n)]
    for t in threads[1:]:
        t.start()
    for t in threads:
        t.join(60)
    assert all(c is not None for c in comms)
    return sorted(comms, key=lambda c: c.rank)  # type: ignore[arg-type]


def on_all(comms: list[HivemindComm], fn) -> list:
    out: list = [None] * len(comms)
    errors: list = []

    def work(i: int) -> None:
        try:
            out[i] = fn(comms[i])
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(comms))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    if errors:
        raise errors[0]
    return out


def test_wire_and_state_codecs_reject_garbage():
    t = torch.randn(5)
    h, b = unpack(pack(tensor_header(t), tensor_bytes(t)))
    assert torch.equal(decode_tensor(h, b, like=t), t)
    with pytest.raises(WireError):
        decode_tensor({**h, "numel": 6}, b)
    with pytest.raises(WireError):
        decode_tensor({**h, "dtype": "object"}, b)
    with pytest.raises(WireError):
        decode_tensor(h, tensor_bytes(torch.tensor([1.0, math.nan, 0, 0, 0])))
    with pytest.raises(WireError):
        unpack(b"\x00\x00\x00\x09{}")
    state = {"model": {"w": torch.arange(6.0).view(2, 3), "b": torch.zeros(0, dtype=torch.bfloat16)},
             "optimizer": {"state": {0: {"step": torch.tensor(3.0)}}, "param_groups": [{"betas": (0.9, 0.95), "lr": 1e-3}]},
             "run": {"time": None, "loss": float("nan"), "name": "x", "ok": True}}
    back = decode_state(encode_state(state))
    assert torch.equal(back["model"]["w"], state["model"]["w"]) and back["model"]["b"].dtype == torch.bfloat16
    assert back["optimizer"]["state"][0]["step"].item() == 3.0  # integer keys survive
    assert back["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.95)
    assert math.isnan(back["run"]["loss"]) and back["run"]["time"] is None
    blob = bytearray(encode_state(state))
    with pytest.raises(WireError):
        decode_state(bytes(blob[:-3]))  # truncated tensor bytes


def test_config_validation_names_the_key():
    with pytest.raises(ValueError, match="comm.request_timeout"):
        validate(Config(request_timeout=5, matchmaking_time=2))
    with pytest.raises(ValueError, match="comm.run_id"):
        validate(Config(run_id="a/b"))
    with pytest.raises(ValueError, match="multiaddr"):
        validate(Config(initial_peers=["127.0.0.1:3000"]))


class ScriptedDHT:
    """Stands in for the DHT under a real `Node` (beside the real-peer tests below): each read returns
    the next scripted {peer id: (record, expiration)}, at the scripted clock."""

    def __init__(self, reads: list[tuple[float, dict]]) -> None:
        self.reads = list(reads)
        self.clock = 0.0

    def get(self, key: str, latest: bool = False) -> SimpleNamespace:
        self.clock, read = self.reads.pop(0)
        return SimpleNamespace(value={pid: SimpleNamespace(value=json.dumps(rec).encode(), expiration_time=until)
                                      for pid, (rec, until) in read.items()})


def test_a_short_dht_read_does_not_drop_a_member_whose_record_is_still_valid(monkeypatch):
    from dtrain.comm.hivemind import node as hivemind_node

    dht = ScriptedDHT([])
    node = hivemind_node.Node.__new__(hivemind_node.Node)  # membership reads only: no daemon
    node.run_id, node.dht, node._closed, node._dht_lock, node._seen = "short", dht, False, threading.Lock(), {}
    node.auth, node.peer_id = None, "a"
    monkeypatch.setattr(hivemind_node, "get_dht_time", lambda: dht.clock)
    comm = Membership(node, heartbeat=1.0, patience=1.0, collective_round=lambda: 0)
    comm.rank = 0
    comm.peers = lambda: sorted(comm.members)  # type: ignore[method-assign]
    live = lambda rank: {"rank": rank, "active": True, "round": 3}  # noqa: E731
    dht.reads = [
        (1.0, {"a": (live(0), 5.0), "b": (live(1), 5.0), "c": (live(2), 5.0)}),
        (2.0, {"a": (live(0), 6.0)}),  # short read: b and c were stored on nodes this read missed
        (3.0, {"a": (live(0), 7.0), "b": (live(1), 7.0), "c": ({"rank": 2, "active": True, "round": 1}, 4.0)}),
        (5.5, {"a": (live(0), 9.0), "b": (live(1), 9.0)}),  # c stopped beating: its record lapsed at 5.0
        (6.0, {"a": (live(0), 9.0), "b": ({"rank": 1, "active": False, "round": 4}, 9.5)}),  # b says it left
    ]
    comm.refresh()
    assert comm.peers() == [0, 1, 2]
    comm.refresh()
    assert comm.peers() == [0, 1, 2]
    comm.refresh()  # an older record of c (earlier expiration) does not replace the newer one
    assert comm.peers() == [0, 1, 2] and node._seen["c"][1] == 5.0
    comm.refresh()
    assert comm.peers() == [0, 1]
    comm.refresh()
    assert comm.peers() == [0]


@pytest.mark.timeout(120)
def test_collectives_exchange_bad_peer_and_departure(tmp_path):
    comms = start_group(3, tmp_path, "unit")
    try:
        assert [c.rank for c in comms] == [0, 1, 2] and all(c.peers() == [0, 1, 2] for c in comms)

        def collectives(c):
            t = [torch.full((4,), float(c.rank)), torch.full((2,), 10.0 * c.rank)]
            c.all_reduce(t, op="mean")
            m = [torch.tensor([float(c.rank)])]
            c.all_reduce(m, op="max")
            b = [torch.full((3,), float(c.rank))]
            c.broadcast(b, src=2)
            g = c.all_gather_bytes(bytes([c.rank]))
            c.barrier()
            return t[0].tolist(), t[1][0].item(), m[0].item(), b[0].tolist(), g

        for mean0, mean1, top, bcast, gathered in on_all(comms, collectives):
            assert mean0 == [1.0] * 4 and mean1 == 10.0 and top == 2.0 and bcast == [2.0] * 3
            assert gathered == [b"\x00", b"\x01", b"\x02"]

        # Pairwise exchange: 0 <-> 1 (rank 2 idle), then rank 1 sends NaN and a wrong shape.
        def pair(c):
            if c.rank == 2:
                return None
            return c.exchange([torch.full((5,), float(c.rank))], 1 - c.rank, tag=1)[0].tolist()

        assert on_all(comms, pair)[:2] == [[1.0] * 5, [0.0] * 5]
        bad = FaultyComm(comms[1], corrupt="nan")

        def nan_pair(c):
            if c.rank == 0:
                with pytest.raises(BadPeerData, match="non-finite"):
                    c.exchange([torch.zeros(5)], 1, tag=2, timeout=5)
                return c.peers()
            if c.rank == 1:
                try:
                    bad.exchange([torch.zeros(5)], 0, tag=2, timeout=2)
                except (PeerTimeout, BadPeerData):
                    pass
            return None

        peers_after = on_all(comms, nan_pair)[0]
        assert 1 not in peers_after  # dropped for bad data, for good

        # A wrong-shaped all_reduce contribution from rank 2 is refused by the leader; 0 goes on.
        def shaped(c):
            if c.rank == 1:
                return None  # rank 0 no longer counts rank 1 in
            comm = FaultyComm(c, corrupt="shape") if c.rank == 2 else c
            t = [torch.ones(4) * (c.rank + 1)]
            try:
                comm.all_reduce(t, op="sum")
            except Exception as e:  # noqa: BLE001 - the bad peer learns it was dropped
                return str(e)
            return t[0].tolist()

        res = on_all(comms, shaped)
        assert res[0] == [1.0] * 4 and "dropped" in res[2]
        assert comms[0].peers() == [0]
        assert comms[0].stats.collectives >= 6 and comms[0].stats.bytes_sent > 0
    finally:
        for c in comms:
            c.close()
    # Closing leaves no daemon of ours behind (they are children of this process).
    left = subprocess.run(["pgrep", "-P", str(os.getpid()), "p2pd"], capture_output=True, text=True).stdout
    assert left.strip() == ""
    # ... and no task pending on a closed loop, for the garbage collector to destroy later with errors logged.
    assert all(c.node.loop.is_closed() and not asyncio.all_tasks(c.node.loop) for c in comms)


@pytest.mark.timeout(60)
def test_a_peer_that_closes_leaves_the_membership_at_once(tmp_path):
    # Records live 4 beats (40 s here): the others must learn of the departure from the record
    # the leaving peer publishes, not from its old one lapsing.
    comms = start_group(2, tmp_path, "leave", heartbeat=10.0)
    try:
        assert all(c.peers() == [0, 1] for c in comms)
        comms[1].close()
        comms[0].refresh()
        left = [rec for rec in comms[0].node.records().values() if rec["rank"] == 1]
        assert left and not any(rec["active"] for rec in left), left
        assert comms[0].peers() == [0]
    finally:
        for c in comms:
            c.close()


@pytest.mark.timeout(60)
def test_exchange_is_sent_again_after_a_transport_error_but_not_after_a_timeout(tmp_path):
    from dtrain.comm.hivemind.wire import NodeError

    comms = start_group(2, tmp_path, "resend")
    real_call, calls = comms[0].node.call, []

    async def flaky_call(peer_id, frame, timeout):  # rank 0's first send of each message breaks
        calls.append(frame)
        if len(calls) in failing:
            if deliver_first:
                await real_call(peer_id, frame, timeout)  # delivered, then the reply is lost
            raise NodeError("stream broke: IncompleteReadError", timed_out=timed_out)
        return await real_call(peer_id, frame, timeout)

    comms[0].node.call = flaky_call

    def pair(c, tag):
        try:
            return c.exchange([torch.full((3,), float(c.rank))], 1 - c.rank, tag=tag, timeout=5)[0].tolist()
        except PeerTimeout as e:
            return str(e)

    try:
        for tag, (failing, deliver_first, timed_out) in enumerate([({1}, True, False), ({1, 2, 3, 4, 5}, False, False)]):
            calls.clear()
            got = on_all(comms, lambda c: pair(c, tag))
            if tag == 0:  # the repeat of a delivered message is ignored: one copy, both sides done
                assert got == [[1.0] * 3, [0.0] * 3] and len(calls) == 2
            else:  # never got through: a few tries, then rank 0 gives up (rank 1 waits out its timeout)
                assert "stream broke" in got[0] and "did not answer" in got[1] and len(calls) == 4
        calls.clear()
        failing, deliver_first, timed_out = {1, 2}, False, True
        got = on_all(comms, lambda c: pair(c, 9))
        assert "stream broke" in got[0] and len(calls) == 1  # a timeout is not sent again
    finally:
        for c in comms:
            c.close()


PEER_SCRIPT = """
import faulthandler, sys, time
from dtrain.comm.hivemind import Config, connect
comm = connect(Config(run_id=sys.argv[1], heartbeat=0.3))
try:
    print("ready", flush=True)
    while True:
        time.sleep(0.1)
finally:
    faulthandler.dump_traceback_later(30)  # a shutdown that hangs shows where, in the test's failure message
    comm.close()
"""


@pytest.mark.timeout(120)
def test_sigterm_and_sigint_shut_a_peer_down_cleanly(tmp_path):
    import signal
    import sys

    from dtrain.testing import peers

    # Peers start as from a terminal: SIGINT at its default. An ignored SIGINT is inherited through exec
    # (a pytest-xdist worker can hold one), and Python then never raises KeyboardInterrupt.
    def default_signals() -> None:
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    logs = [tmp_path / f"peer{i}.log" for i in range(2)]  # files: a pipe nobody reads can fill and block a peer
    procs = [subprocess.Popen([sys.executable, "-c", PEER_SCRIPT, f"sig{i}"], cwd=peers.REPO, env=peers.peer_env(),
                              stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
                              preexec_fn=default_signals)
             for i, log in enumerate(logs)]
    try:
        for p, log in zip(procs, logs):
            deadline = time.monotonic() + 90
            while "ready" not in log.read_text():
                assert p.poll() is None, f"peer exited before it was ready: {log.read_text()[-2000:]}"
                assert time.monotonic() < deadline, "peer not ready within 90 s"
                time.sleep(0.1)
        procs[0].send_signal(signal.SIGTERM)
        procs[1].send_signal(signal.SIGINT)
        codes = peers.wait(procs, timeout=60)
        tails = "\n".join(f"--- peer {i}: {log.read_text()[-3000:]}" for i, log in enumerate(logs))
        assert codes[0] == 143 and codes[1] in (-2, 1, 130), f"exit codes {codes}\n{tails}"  # SystemExit(128+15); KeyboardInterrupt
        assert peers.stray_daemons(procs, settle_s=0.5) == []
    finally:
        peers.stop(procs)


def test_a_new_member_record_is_inactive_until_the_comm_knows_it_is_not_joining():
    # The first record a peer publishes claims its rank; were it "active, from round 0", survivors
    # would pair a joiner in rounds fixed before its admission (and wait on it there).
    node = SimpleNamespace(peer_id="j", publish=lambda rec, ttl: None, records=dict)
    record = Membership(node, heartbeat=1.0, patience=1.0, collective_round=lambda: 0).record()
    assert record["active"] is False and record["from"] == 0
