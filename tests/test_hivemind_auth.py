"""The run key: sealed messages and signed records (unit), and intruders against real peers on loopback."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch

pytest.importorskip("hivemind")

from dtrain.comm.hivemind import Config, HivemindComm, validate  # noqa: E402
from dtrain.comm.hivemind.auth import AuthError, ReplayGuard, RunKey, load_run_key  # noqa: E402
from dtrain.comm.hivemind.wire import pack, tensor_bytes, tensor_header, unpack  # noqa: E402

SECRET = b"0123456789abcdef-honest"


def contrib(round_: int, values: torch.Tensor) -> bytes:
    return pack({**tensor_header(values), "op": "contrib", "round": round_, "kind": "reduce:sum", "src": 1},
                tensor_bytes(values))


def test_a_sealed_message_opens_only_unchanged_from_its_sender_to_its_receiver_once():
    key = RunKey(SECRET, "run")
    frame = contrib(3, torch.ones(4))
    sealed = key.seal(frame, sender="A", receiver="B", seq=7)
    opened = key.open(sealed, sender="A", receiver="B")
    assert opened.frame == frame and opened.seq == 7 and opened.reply_to is None
    header_at = sealed.index(b'"round":3') + len('"round":')
    for name, forged in [
        ("tampered header: replayed into round 4", sealed[:header_at] + b"4" + sealed[header_at + 1 :]),
        ("tampered payload", sealed[:-1] + bytes([sealed[-1] ^ 1])),
        ("truncated", sealed[:-3]),
        ("unsealed", frame),
    ]:
        with pytest.raises(AuthError):
            key.open(forged, sender="A", receiver="B")
        assert name
    with pytest.raises(AuthError):  # another receiver, another claimed sender
        key.open(sealed, sender="A", receiver="C")
    with pytest.raises(AuthError):
        key.open(sealed, sender="X", receiver="B")
    with pytest.raises(AuthError):  # another run id with the same secret, or another secret
        RunKey(SECRET, "other").open(sealed, sender="A", receiver="B")
    with pytest.raises(AuthError):
        RunKey(b"fedcba9876543210-intruder", "run").open(sealed, sender="A", receiver="B")
    guard = ReplayGuard()
    guard.check("A", opened.seq)
    with pytest.raises(AuthError, match="replay"):  # the same message again
        guard.check("A", key.open(sealed, sender="A", receiver="B").seq)
    guard.check("B", 7)  # sequence numbers are per sender


def test_a_signed_record_verifies_only_for_its_peer_and_expiration():
    key = RunKey(SECRET, "run")
    rec = key.sign_record("A", {"rank": 0, "active": True, "round": 2}, until=100.0)
    assert key.verify_record("A", rec, 100.0)["rank"] == 0
    for pid, record, expires in [
        ("B", rec, 100.0),  # copied under another peer id
        ("A", {**rec, "rank": 1}, 100.0),  # altered
        ("A", rec, 500.0),  # stored again to live longer than it was signed for
        ("A", {"rank": 0, "active": True, "round": 2}, 100.0),  # not signed
    ]:
        with pytest.raises(AuthError):
            key.verify_record(pid, record, expires)
    with pytest.raises(AuthError):
        RunKey(b"fedcba9876543210-intruder", "run").verify_record("A", rec, 100.0)


def test_run_key_errors_are_one_line_and_never_show_the_key(tmp_path, monkeypatch):
    good = tmp_path / "key"
    good.write_bytes(SECRET + b"\n")
    assert load_run_key(str(good), "") == SECRET
    monkeypatch.setenv("DTRAIN_TEST_KEY", SECRET.decode())
    assert load_run_key("", "DTRAIN_TEST_KEY") == SECRET
    assert load_run_key("", "") is None
    (tmp_path / "empty").write_text("\n")
    (tmp_path / "short").write_text("s3cret")
    monkeypatch.setenv("DTRAIN_SHORT_KEY", "s3cret")
    for kwargs, match in [
        ({"run_key_file": str(tmp_path / "missing")}, "cannot be read"),
        ({"run_key_file": str(tmp_path / "empty")}, "empty"),
        ({"run_key_file": str(tmp_path / "short")}, "at least 16 bytes"),
        ({"run_key_env": "DTRAIN_UNSET_KEY_VAR"}, "empty or unset"),
        ({"run_key_env": "DTRAIN_SHORT_KEY"}, "at least 16 bytes"),
        ({"run_key_file": str(good), "run_key_env": "DTRAIN_TEST_KEY"}, "not both"),
        ({"run_key_env": "a key, not a name"}, "NAME of an environment variable"),
    ]:
        with pytest.raises(ValueError, match=match) as err:
            validate(Config(**kwargs))
        assert "\n" not in str(err.value) and "s3cret" not in str(err.value) and SECRET.decode() not in str(err.value)


# -- real peers -----------------------------------------------------------------------------


def start_group(n: int, tmp_path, run_id: str, key_file: str) -> list[HivemindComm]:
    comms: list[HivemindComm | None] = [None] * n
    maddr = tmp_path / f"{run_id}.maddr"
    knobs = dict(run_id=run_id, min_peers=n, request_timeout=1.0, matchmaking_time=5.0, heartbeat=0.3, run_key_file=key_file)

    def start(i: int) -> None:
        extra = {"rank": 0, "maddr_file": str(maddr)} if i == 0 else {"initial_peers": [maddr.read_text().split()[0]]}
        comms[i] = HivemindComm(Config(**knobs, **extra))

    threads = [threading.Thread(target=start, args=(0,))]
    threads[0].start()
    while not (maddr.exists() and maddr.read_text().strip()):
        time.sleep(0.05)
    threads += [threading.Thread(target=start, args=(i,)) for i in range(1, n)]
    for t in threads[1:]:
        t.start()
    for t in threads:
        t.join(60)
    assert all(c is not None for c in comms)
    return sorted(comms, key=lambda c: c.rank)  # type: ignore[arg-type]


class Intruder:
    """A real p2p peer on the run's DHT that knows an address and the run id, with a wrong key or none.
    It claims a membership record and sends finite garbage (x1000) into rounds and mailboxes."""

    def __init__(self, addr: str, run_id: str, secret: bytes | None) -> None:
        from dtrain.comm.hivemind.node import Node

        async def handler(_pid: str, _frame: bytes) -> bytes:
            return pack({"ok": True, "rank": 5})

        self.node = Node(run_id=run_id, initial_peers=[addr], host_maddrs=["/ip4/127.0.0.1/tcp/0"], announce_maddrs=[],
                         handler=handler, auth=RunKey(secret, run_id) if secret else None)

    def attack(self, targets: list[str], numel: int) -> None:
        self.node.publish({"rank": 5, "active": True, "round": 0}, ttl=60)
        garbage = torch.full((numel,), 1000.0)
        frames = [contrib(r, garbage) for r in range(4)]
        mail = pack({"op": "x", "src": 1, "tag": 1, **tensor_header(torch.full((5,), 1000.0))}, tensor_bytes(torch.full((5,), 1000.0)))

        async def send_all() -> None:
            calls = [self.node.call(pid, f, 20.0) for pid in targets for f in frames] + [self.node.call(targets[0], mail, 5.0)]
            self.sent = await asyncio.gather(*calls, return_exceptions=True)

        self.pending = asyncio.run_coroutine_threadsafe(send_all(), self.node.loop)


def honest_round(comms: list[HivemindComm]) -> tuple[list, list, list]:
    out: dict[int, tuple] = {}

    def work(c: HivemindComm) -> None:
        t = [torch.full((4,), float(c.rank + 1))]
        c.all_reduce(t, op="mean")
        got = c.exchange([torch.full((5,), float(c.rank))], 1 - c.rank, tag=1, timeout=10)[0]
        out[c.rank] = (t[0].tolist(), got.tolist(), c.peers())

    threads = [threading.Thread(target=work, args=(c,)) for c in comms]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return [out[r] for r in sorted(out)]


@pytest.mark.timeout(150)
@pytest.mark.parametrize("keyed", [True, False], ids=["keyed", "open-run-control"])
def test_intruders_never_reach_a_tensor_of_a_keyed_run(tmp_path, keyed):
    # The control (no run key) shows the attack is real: there the garbage lands in the mean
    # and the mailbox. With a key the honest numbers are exactly those of an honest-only run.
    key_file = tmp_path / "run.key"
    key_file.write_bytes(SECRET)
    comms = start_group(2, tmp_path, f"auth{int(keyed)}", str(key_file) if keyed else "")
    addr = comms[0].node.visible_maddrs()[0]
    intruders = [Intruder(addr, comms[0].cfg.run_id, secret) for secret in ([b"fedcba9876543210-intruder", None] if keyed else [None])]
    try:
        for intruder in intruders:
            intruder.attack([c.peer_id for c in comms], 4)
        time.sleep(1.0)  # the records and messages are in before the honest round starts
        for c in comms:
            c.refresh()
        results = honest_round(comms)
        if not keyed:
            (mean0, got0, _), _ = results
            assert mean0 != [1.5] * 4 or got0 != [1.0] * 5, "the control's intruder should have poisoned the open run"
            return
        assert results == [([1.5] * 4, [1.0] * 5, [0, 1]), ([1.5] * 4, [0.0] * 5, [0, 1])]
        for c in comms:  # every intruder reported and counted; none a member
            assert {i.node.peer_id for i in intruders} <= set(c.node.rejected), c.node.rejected
            assert all(rec["rank"] != 5 for rec in c.node.records().values())
        for intruder in intruders:
            intruder.pending.result(30)
            replies = [r for r in intruder.sent if isinstance(r, bytes)]
            assert all(not unpack(r)[0].get("ok") for r in replies)  # refused, never answered with a result
    finally:
        for intruder in intruders:
            intruder.node.close()
        for c in comms:
            c.close()


def raw_peer_ids(node, run_id: str) -> list[str]:
    """Peer ids under the run's members key as an intruder reads them (no key: it checks nothing)."""
    from dtrain.comm.hivemind.node import _decode_records
    from hivemind.utils import get_dht_time

    return sorted(_decode_records(node.dht.get(f"dtrain/{run_id}/members", latest=True), get_dht_time()))


@pytest.mark.timeout(300)
def test_a_keyed_diloco_run_attacked_by_intruders_equals_the_honest_run(tmp_path):
    import json

    from dtrain.config import load, section_module
    from dtrain.testing import peers
    from dtrain.train import run

    key_file = tmp_path / "run.key"
    key_file.write_bytes(SECRET)
    args = ["configs/diloco.yaml", "workload.name=char_lm", "workload.n_layer=1", "workload.d_model=32", "workload.n_head=2",
            "workload.seq_len=32", "workload.batch_size=8", "workload.eval_batches=2", "steps=40", "eval_every=40",
            "ckpt_every=0", "progress=false", "plot=false", "threads=1", "algo.sync_every=10"]
    hm = ["comm.name=hivemind", "comm.run_id=keyed", "comm.min_peers=2", "comm.request_timeout=2",
          "comm.matchmaking_time=60", "comm.heartbeat=0.5", f"comm.run_key_file={key_file}"]
    cfg = load(args[0], args[1:])
    model = section_module("workload", cfg.workload.name).build(cfg.workload, seed=cfg.seed).build_model()
    numel = sum(p.numel() for p in model.parameters())
    procs, addr = peers.start_run(2, [*args, *hm, f"out_dir={tmp_path / 'out'}"], tmp_path)
    intruders = []
    try:
        intruders = [Intruder(addr, "keyed", s) for s in (b"fedcba9876543210-intruder", None)]
        targets: list[str] = []
        while len(targets) < 2 and all(p.poll() is None for p in procs):
            targets = raw_peer_ids(intruders[0].node, "keyed")
            time.sleep(0.2)
        for intruder in intruders:  # x1000 into the first rounds (setup, then every outer step)
            intruder.attack(targets, numel)
        codes = peers.wait(procs, timeout=240)
        text = "\n".join((tmp_path / f"peer{i}.log").read_text()[-3000:] for i in range(2))
        assert codes == [0, 0], text
    finally:
        for intruder in intruders:
            intruder.node.close()
        peers.stop(procs)
    torch.set_num_threads(1)
    ref = run(load(args[0], [*args[1:], f"out_dir={tmp_path / 'local'}", "comm.name=local", "comm.workers=2"]))
    got = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert got["workers_reporting"] == 2
    assert got["eval"]["value"] == pytest.approx(ref["eval"]["value"], rel=1e-5)
    assert got["final_loss"] == pytest.approx(ref["final_loss"], rel=1e-5)
    for i in range(2):  # each intruder reported by name, once, and counted at the end
        log = (tmp_path / f"peer{i}.log").read_text()
        for intruder in intruders:
            assert log.count(f"ignoring peer {intruder.node.peer_id[:16]}") == 1, log[-3000:]
        assert "without this run's key" in log
    assert str(SECRET.decode()) not in (tmp_path / "out" / "config.yaml").read_text() + text
