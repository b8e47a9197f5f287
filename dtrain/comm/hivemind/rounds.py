"""Leader-run collective rounds and exchange mailboxes for `HivemindComm` (see its docstring).

Everything here that touches round state runs on the node's asyncio loop (one thread), so no
locks are needed for it; the caller's thread only submits coroutines and waits.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections import OrderedDict
from typing import Any

import torch

from dtrain.comm.base import CommError
from dtrain.comm.hivemind.wire import NodeError, WireError, decode_tensor, pack, pack_list, tensor_bytes, unpack

KEEP_CLOSED = 16  # finished rounds kept to answer late contributors
MAX_MAIL = 512  # exchange messages held for rounds this peer has not reached yet
SEND_ATTEMPTS = 4  # an exchange message is sent at most this often after transport errors
RESEND_BACKOFF_S = 0.1  # doubled after each failed attempt


class _Round:
    def __init__(self) -> None:
        self.kind: str | None = None
        self.contribs: dict[int, tuple[str, dict, bytes]] = {}  # rank -> (peer id, header, body)
        self.arrived = asyncio.Event()
        self.done = asyncio.Event()
        self.result = b""
        self.replies: dict[int, bytes] = {}  # per-contributor answers that differ from `result`
        self.out_of_step: set[int] = set()  # ranks that asked for another kind of round: not waited for


class Rounds:
    def __init__(self, comm: Any) -> None:  # the HivemindComm that owns these rounds (not imported: no cycle)
        self.comm = comm
        self.next_round = 0
        self.adopt_next = False
        self.rounds: dict[int, _Round] = {}
        self.closed: OrderedDict[int, tuple[str, bytes]] = OrderedDict()
        self.adopters: list[tuple[int, str, dict, bytes, asyncio.Future]] = []
        self._mail: OrderedDict[tuple[int, int], concurrent.futures.Future] = OrderedDict()
        self._mail_lock = threading.Lock()

    # -- caller side ----------------------------------------------------------------------
    def _timeout(self) -> float:
        return 2 * self.comm.cfg.matchmaking_time + 2 * self.comm.cfg.request_timeout

    def run(self, kind: str, header: dict, body: bytes) -> tuple[dict, bytes]:
        """One collective round; returns the leader's result header and body."""
        comm, node = self.comm, self.comm.node
        for _attempt in range(16):
            live = comm.peers()
            leader = min(live) if live else comm.rank
            r = -1 if self.adopt_next and leader != comm.rank else self.next_round
            if leader == comm.rank or node.run(self._has_contribs(r)):
                r = self.next_round if r < 0 else r
                reply = node.run(self._lead(r, kind, header, body), timeout=self._timeout())
            else:
                pid = comm.members[leader]
                frame = pack({**header, "op": "contrib", "round": r, "kind": kind, "src": comm.rank}, body)
                try:
                    reply = node.run(node.call(pid, frame, self._timeout()))
                except Exception:  # noqa: BLE001 - NodeError: the leader is gone; elect the next one
                    comm.mark_dead(pid)
                    continue
            try:
                h, b = unpack(reply)
            except WireError as e:
                raise CommError(f"{kind}: unreadable reply from the leader ({e})") from None
            if h.get("resync"):
                self.adopt_next = True  # out of step with the group: take the leader's next round
                continue
            if not h.get("ok"):
                raise CommError(f"{kind} failed: {h.get('error', 'no reason given')}")
            self.next_round = int(h["round"]) + 1
            self.adopt_next = False
            for pid in h.get("bad", []):
                comm.mark_bad(pid, "rejected by the leader")
            for pid in h.get("dead", []):
                comm.mark_dead(pid)
            return h, b
        raise CommError(f"{kind}: no leader completed the round after 16 tries")

    def solo(self, kind: str, header: dict, body: bytes) -> tuple[dict, bytes]:
        """A collective of one (a joining peer before `activate`): the result is this peer's own data."""
        out = pack_list([body]) if kind == "gather" else body
        return {"ok": True, "ranks": [self.comm.rank], "round": -1, **{k: v for k, v in header.items() if k in ("dtype", "numel")}}, out

    async def _has_contribs(self, r: int) -> bool:
        rnd = self.rounds.get(r)
        return rnd is not None and any(src != self.comm.rank for src in rnd.contribs)

    # -- leader side ----------------------------------------------------------------------
    async def _lead(self, r: int, kind: str, header: dict, body: bytes) -> bytes:
        comm, cfg = self.comm, self.comm.cfg
        loop = asyncio.get_running_loop()
        rnd = self.rounds.setdefault(r, _Round())
        rnd.kind = kind
        rnd.contribs[comm.rank] = (comm.peer_id, {**header, "kind": kind}, body)
        for item in list(self.adopters):
            src, pid, h, b, fut = item
            if h.get("kind") == kind:
                rnd.contribs[src] = (pid, h, b)
                self.adopters.remove(item)
                asyncio.ensure_future(self._answer_adopter(rnd, src, fut))
        expected, dropped = set(comm.peers()), set()
        deadline = loop.time() + cfg.matchmaking_time
        next_ping = loop.time() + min(1.0, cfg.request_timeout)
        while True:
            adopting = {item[0] for item in self.adopters}
            missing = expected - set(rnd.contribs) - dropped - rnd.out_of_step - adopting
            if not missing:
                break
            now = loop.time()
            if now >= deadline:
                dropped |= missing
                break
            if now >= next_ping:
                dropped |= await self._ping(missing)
                expected |= set(comm.peers())
                next_ping = loop.time() + 1.0
            rnd.arrived.clear()
            try:
                await asyncio.wait_for(rnd.arrived.wait(), 0.1)
            except asyncio.TimeoutError:
                pass
        self._finish(r, rnd, kind, header, body)
        return rnd.replies.get(comm.rank, rnd.result)

    async def _answer_adopter(self, rnd: _Round, src: int, fut: asyncio.Future) -> None:
        await rnd.done.wait()
        if not fut.done():
            fut.set_result(rnd.replies.get(src, rnd.result))

    async def _ping(self, ranks: set[int]) -> set[int]:
        """Ranks that are gone: not live members any more, or not answering a ping."""
        comm = self.comm
        gone = {r for r in ranks if comm.members.get(r) is None}
        alive = [r for r in ranks if r not in gone]
        frame = pack({"op": "ping"})
        results = await asyncio.gather(
            *(comm.node.call(comm.members[r], frame, comm.cfg.request_timeout) for r in alive), return_exceptions=True
        )
        for r, res in zip(alive, results):
            if isinstance(res, BaseException):
                pid = comm.members.get(r)
                if pid is not None:
                    comm.mark_dead(pid)
                gone.add(r)
        return gone

    def _finish(self, r: int, rnd: _Round, kind: str, header: dict, body: bytes) -> None:
        comm = self.comm
        resync = pack({"ok": False, "resync": True, "error": f"round {r} is a {kind}"})
        valid: dict[int, Any] = {}
        bad: list[str] = []
        mine = decode_tensor(header, body, finite=False) if kind.startswith("reduce") else None
        for src, (pid, h, b) in sorted(rnd.contribs.items()):
            if h.get("kind") != kind:
                rnd.replies[src] = resync
                continue
            try:
                if mine is not None:
                    valid[src] = mine if src == comm.rank else decode_tensor(h, b, like=mine)
                elif kind == "broadcast":
                    if (h.get("dtype"), h.get("numel"), h.get("root")) != (header.get("dtype"), header.get("numel"), header.get("root")):
                        raise WireError("broadcast of another shape or source")
                    valid[src] = b
                else:
                    valid[src] = b
            except WireError as e:
                comm.mark_bad(pid, str(e))
                bad.append(pid)
                rnd.replies[src] = pack({"ok": False, "error": f"dropped by the leader: {e}"})
        ranks = sorted(valid)
        out = pack({"ok": False, "error": "unknown collective"})
        head = {"ok": True, "round": r, "kind": kind, "ranks": ranks, "bad": bad, "dead": sorted(comm.dead)}
        if mine is not None:
            acc = valid[ranks[0]].clone()
            for src in ranks[1:]:
                if kind == "reduce:min":
                    torch.minimum(acc, valid[src], out=acc)
                elif kind == "reduce:max":
                    torch.maximum(acc, valid[src], out=acc)
                else:
                    acc.add_(valid[src])
            out = pack({**head, "dtype": header["dtype"], "numel": header["numel"]}, tensor_bytes(acc))
        elif kind == "broadcast":
            root = header["root"]
            if root in valid and (valid[root] or not header["numel"]):
                out = pack({**head, "dtype": header["dtype"], "numel": header["numel"]}, valid[root])
            else:
                out = pack({"ok": False, "error": f"broadcast source rank {root} is not in the group"})
        elif kind == "gather":
            out = pack(head, pack_list([valid[s] for s in ranks]))
        rnd.result = out
        rnd.done.set()
        self.rounds.pop(r, None)
        self.closed[r] = (kind, out)
        while len(self.closed) > KEEP_CLOSED:
            self.closed.popitem(last=False)

    # -- handler (every incoming RPC) ----------------------------------------------------------
    async def handle(self, peer_id: str, frame: bytes) -> bytes:
        try:
            header, body = unpack(frame)
        except WireError as e:
            return pack({"ok": False, "error": str(e)})
        if peer_id in self.comm.bad:
            return pack({"ok": False, "error": "you were dropped from this run for sending bad data"})
        op = header.get("op")
        src = header.get("src")
        if op == "ping":
            return pack({"ok": True, "rank": self.comm.rank})
        if op == "state":
            return await self.comm.on_state_request(peer_id)
        if not isinstance(src, int) or isinstance(src, bool):
            return pack({"ok": False, "error": "missing src rank"})
        if op == "x":
            tag = header.get("tag")
            if not isinstance(tag, int):
                return pack({"ok": False, "error": "missing tag"})
            fut = self.mailbox(src, tag)
            if not fut.done():
                fut.set_result((header, body))
            return pack({"ok": True})
        if op == "contrib":
            return await self._on_contrib(peer_id, src, header, body)
        return pack({"ok": False, "error": f"unknown op {op!r}"})

    async def _on_contrib(self, peer_id: str, src: int, header: dict, body: bytes) -> bytes:
        r, kind = header.get("round"), header.get("kind")
        if not isinstance(r, int) or not isinstance(kind, str):
            return pack({"ok": False, "error": "missing round or kind"})
        if r < 0:  # adopt: wait for the next round of this kind that this peer leads or is leading
            for rr, rnd in self.rounds.items():
                if rnd.kind == kind and not rnd.done.is_set() and self.comm.rank in rnd.contribs:
                    r = rr
                    break
            else:
                fut = asyncio.get_running_loop().create_future()
                self.adopters.append((src, peer_id, header, body, fut))
                try:
                    return await asyncio.wait_for(fut, self._timeout())
                except asyncio.TimeoutError:
                    return pack({"ok": False, "error": "no round of this kind started in time"})
        if r in self.closed:
            closed_kind, result = self.closed[r]
            if closed_kind != kind:
                return pack({"ok": False, "resync": True, "error": f"round {r} was a {closed_kind}"})
            return result  # late: the group's result, without this peer's contribution
        if r < self.next_round and r not in self.rounds:
            return pack({"ok": False, "resync": True, "error": f"round {r} is over"})
        rnd = self.rounds.setdefault(r, _Round())
        if rnd.kind is not None and rnd.kind != kind:
            rnd.out_of_step.add(src)
            rnd.arrived.set()
            return pack({"ok": False, "resync": True, "error": f"round {r} is a {rnd.kind}"})
        rnd.contribs[src] = (peer_id, header, body)
        rnd.arrived.set()
        try:
            await asyncio.wait_for(rnd.done.wait(), self._timeout())
        except asyncio.TimeoutError:
            rnd.contribs.pop(src, None)
            return pack({"ok": False, "error": f"round {r} did not finish in time"})
        return rnd.replies.get(src, rnd.result)

    # -- exchange mailboxes ----------------------------------------------------------------
    def mailbox(self, src: int, tag: int) -> concurrent.futures.Future:
        with self._mail_lock:
            fut = self._mail.get((src, tag))
            if fut is None:
                fut = self._mail[(src, tag)] = concurrent.futures.Future()
                while len(self._mail) > MAX_MAIL:
                    self._mail.popitem(last=False)
            return fut

    def forget(self, src: int, tag: int) -> None:
        with self._mail_lock:
            self._mail.pop((src, tag), None)

    def send_async(self, peer_id: str, frame: bytes) -> concurrent.futures.Future:
        """Deliver an exchange message (see `_deliver`); the future holds the receiver's reply."""
        return asyncio.run_coroutine_threadsafe(self._deliver(peer_id, frame), self.comm.node.loop)

    async def _deliver(self, peer_id: str, frame: bytes) -> bytes:
        # Sent again after a transport error (a dial that failed under load, a stream that broke
        # after the receiver had the message): its mailbox keeps the first copy, so a repeat is
        # harmless. Not after a timeout, nor to a peer seen gone, and a few times at most, so a
        # dead peer costs well under a second.
        node, loop = self.comm.node, asyncio.get_running_loop()
        deadline = loop.time() + self.comm.cfg.matchmaking_time
        attempt = 0
        while True:
            try:
                return await node.call(peer_id, frame, max(deadline - loop.time(), 0.01))
            except NodeError as e:
                attempt += 1
                if e.timed_out or attempt >= SEND_ATTEMPTS or peer_id in self.comm.dead or loop.time() >= deadline:
                    raise
            await asyncio.sleep(RESEND_BACKOFF_S * 2 ** (attempt - 1))
