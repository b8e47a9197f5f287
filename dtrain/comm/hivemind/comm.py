"""hivemind backend: peers find each other through a hivemind DHT and talk over its p2p transport.

Launch: the first peer starts with ``comm.initial_peers=[]`` and prints its multiaddr; every
other peer passes that address (``launchers/hivemind_peer.sh``). ``comm.run_id`` keeps runs that
share a DHT apart (membership key and RPC protocol name both carry it).

Ranks. hivemind has none, so the backend keeps its own: ``comm.rank`` if given (>= 0), else
the peer claims ``1 + the highest rank among live records`` in the run's DHT membership record
(ties between peers that claim at the same moment go to the smaller peer id; the loser
re-claims). A rank is stable for the peer's life; a newcomer's rank is above every live
peer's, so it never takes the leadership from a peer already in the run (it may reuse the rank
of a peer that has left, and with it that rank's data shard). ``peers()`` lists the ranks of live peers (heartbeat records in
the DHT, minus peers seen dead or dropped for bad data); ``world_size`` is the number of
peers in the last completed collective (or, before any, of live peers), so it changes as peers
come and go, and ranks need not be dense.

Collectives (all_reduce, broadcast, all_gather_bytes, barrier) go through a leader, the live
peer with the smallest rank: every peer sends its contribution for round r (each peer counts
its collectives) to the leader in one RPC; the leader waits for all live peers (pinging the
missing ones, so a killed peer is dropped within ``request_timeout``, and a slow one is waited
for up to ``matchmaking_time``), validates every contribution (dtype, size, finite), drops a
bad peer for good, reduces in rank order (bit-identical on every peer, and equal to the local
backend) and answers each RPC with the result. If the leader dies the next smallest rank
leads. A peer that falls out of step (its contribution arrives for a round of another kind, or
after the round closed) re-joins at the leader's next round ("adopt"). all_gather_bytes
returns a list indexed by rank in which a rank that did not take part (dead, dropped) has an
empty payload, so callers that decode each payload skip it (train.py's end-of-run records then
show workers_reporting < world_size).
Star traffic is O(N) at the leader; `stats` still count the ring model of `dtrain.comm.base`.

exchange (NoLoCo gossip) is direct: each side sends its buffer to the other's handler and
waits for the other's message with the same tag in its mailbox. A message is sent again after a
transport error (the mailbox keeps the first copy, so delivery is at least once and a repeat is
harmless), and the wait ends early once the peer has left the run (its record lapsed or said so).

A peer that starts while a run is under way joins: `fetch_state()` returns a live peer's current
state (see `join` and `membership`), the loop loads it and calls `activate()`; until then its
collectives complete alone. Every live peer's loop calls `serve_state(provider)` at each step
boundary, which answers joiners that wait. `peers_in_round(r)` is the membership of round r of a
schedule that each peer computes alone (NoLoCo), fixed per round and equal on every peer.

Run key (`comm.run_key_file` / `comm.run_key_env`, see `auth`): every message is sealed and every
membership record signed; a peer without the key is never a member and nothing it sends is parsed.

Shutdown: `close()` (also on SIGTERM, turned into SystemExit) stops the daemon; a watchdog
kills it if this process dies any other way (see `node`).
"""

from __future__ import annotations

import concurrent.futures
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from dtrain.comm.base import BadPeerData, Comm, CommError, Handle, PeerTimeout
from dtrain.comm.hivemind.auth import RunKey, load_run_key
from dtrain.comm.hivemind.config import Config, validate
from dtrain.comm.hivemind.join import StateRequests, decode_state, encode_state
from dtrain.comm.hivemind.membership import Membership
from dtrain.comm.hivemind.rounds import Rounds
from dtrain.comm.hivemind.wire import WireError, decode_tensor, pack, tensor_bytes, tensor_header, unpack, unpack_list

log = logging.getLogger(__name__)


def connect(cfg: Config) -> HivemindComm:
    try:
        import hivemind  # noqa: F401
    except ImportError:
        raise CommError("comm.name=hivemind needs hivemind: pip install 'dtrain[hivemind]'") from None
    comm = HivemindComm(cfg)
    _exit_on_sigterm()
    return comm


def _exit_on_sigterm() -> None:
    """SIGTERM -> SystemExit in the main thread, so `finally: comm.close()` runs (no orphaned p2pd)."""
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))


class HivemindComm(Comm):
    def __init__(self, cfg: Config) -> None:
        super().__init__()
        from dtrain.comm.hivemind.node import Node

        validate(cfg)
        self.cfg = cfg
        secret = load_run_key(cfg.run_key_file, cfg.run_key_env)
        if secret is None:
            log.warning("hivemind: run %r has no run key (comm.run_key_file / comm.run_key_env): anyone who knows "
                        "a peer's address and the run id can join it and send it data", cfg.run_id)
        self.rounds = Rounds(self)
        self.node = Node(
            run_id=cfg.run_id, initial_peers=list(cfg.initial_peers), host_maddrs=list(cfg.host_maddrs),
            announce_maddrs=list(cfg.announce_maddrs), handler=self.rounds.handle,
            auth=RunKey(secret, cfg.run_id) if secret is not None else None,
        )
        del secret
        self.peer_id = self.node.peer_id
        self.membership = Membership(self.node, heartbeat=cfg.heartbeat, patience=cfg.matchmaking_time,
                                     collective_round=lambda: self.rounds.next_round)
        self.requests = StateRequests(self.node.loop)
        self.rank = -1
        self._provider_seen = False
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None
        try:
            if cfg.maddr_file:
                with open(cfg.maddr_file, "w") as f:
                    f.write("\n".join(self.node.visible_maddrs()) + "\n")
            self.rank = self.membership.rank = cfg.rank if cfg.rank >= 0 else self.membership.claim_rank()
            self.membership.publish()
            self.joining = self.membership.run_in_progress()
            self.membership.active = not self.joining
            self.membership.publish()
            self._beat = threading.Thread(target=self._heartbeat, name="hivemind-comm-heartbeat", daemon=True)
            self._beat.start()
            self._wait_for_peers()
        except BaseException:
            self.close()
            raise
        self.world_size = len(self.peers())
        log.warning("hivemind peer rank %d: %s", self.rank, " ".join(self.node.visible_maddrs()))

    # -- membership (see `membership`) ---------------------------------------------------------
    @property
    def members(self) -> dict[int, str]:
        return self.membership.members

    @property
    def dead(self) -> set[str]:
        return self.membership.dead

    @property
    def bad(self) -> set[str]:
        return self.membership.bad

    @property
    def active(self) -> bool:
        return self.membership.active

    def refresh(self) -> dict[str, dict]:
        return self.membership.refresh()

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.cfg.heartbeat):
            try:
                self.membership.publish()
                self.membership.refresh()
            except Exception as e:  # noqa: BLE001 - a missed beat is retried; the DHT may be shutting down
                log.debug("hivemind heartbeat failed: %s", e)

    def _wait_for_peers(self) -> None:
        deadline = time.monotonic() + self.cfg.join_timeout
        while True:
            self.refresh()
            if self.joining or len(self.members) >= self.cfg.min_peers:
                return
            if time.monotonic() > deadline:
                raise CommError(f"only {len(self.members)} of comm.min_peers={self.cfg.min_peers} peers joined within "
                                f"{self.cfg.join_timeout}s; check comm.initial_peers (and that every peer has the same "
                                "run key) or lower comm.min_peers")
            time.sleep(0.2)

    def peers(self) -> list[int]:
        return sorted(self.members) if self.active else [self.rank]

    def peers_in_round(self, round_: int) -> list[int]:
        return self.membership.peers_in_round(round_)

    def peer_of(self, rank: int) -> str | None:
        pid = self.membership.peer_of(rank)
        if pid is None:
            self.refresh()
            pid = self.membership.peer_of(rank)
        return pid

    def rank_of(self, peer_id: str) -> int | None:
        return next((r for r, p in self.members.items() if p == peer_id), None)

    def mark_dead(self, peer_id: str) -> None:
        self.membership.mark_dead(peer_id)

    def mark_bad(self, peer_id: str, reason: str) -> None:
        self.membership.mark_bad(peer_id, reason)

    # -- joining (see `join`, `membership`) -------------------------------------------------------
    def fetch_state(self) -> dict[str, Any] | None:
        """A live peer's current state if this peer joins a run under way (None otherwise); after
        loading it, call `activate()`. Paired in rounds from the one the server admitted us to."""
        if not self.joining or self.active:
            return None
        self.membership.joining = True
        self.membership.publish()
        errors = []
        try:  # survivors acknowledge while we ask (see `membership`); `activate` ends it
            self.refresh()
            for rank, pid in sorted(self.members.items()):
                if pid == self.peer_id:
                    continue
                try:
                    frame = pack({"op": "state", "src": self.rank})
                    header, body = unpack(self.node.run(self.node.call(pid, frame, 4 * self.cfg.matchmaking_time)))
                    if not header.get("ok"):
                        errors.append(f"rank {rank}: {header.get('error')}")
                        continue
                    state, first = decode_state(body), header.get("from")
                    if not isinstance(state, dict) or "model" not in state or not isinstance(state.get("step"), int) \
                            or not isinstance(first, int):
                        raise WireError("not a training state")
                except Exception as e:  # noqa: BLE001 - try the next peer
                    errors.append(f"rank {rank}: {e}")
                    continue
                self.membership.from_round = first
                log.warning("hivemind: rank %d joins run %r at step %d from rank %d (paired from round %d)",
                            self.rank, self.cfg.run_id, state["step"], rank, first)
                return state
        except BaseException:
            self.membership.joining = False
            raise
        self.membership.joining = False
        raise CommError(f"joining run {self.cfg.run_id!r}: no live peer sent its state ({'; '.join(errors) or 'no peers'}); "
                        "check that every peer runs the same config and run key, or start a new comm.run_id")

    def serve_state(self, provider: Callable[[], dict[str, Any]]) -> None:
        """Call at every step boundary of the training loop: answers admitted joiners with ``provider()``."""
        if not self._provider_seen:
            self._provider_seen = self.membership.serving = True
            self.membership.publish()
        ready = [p for p in list(self.requests.waiting) if p in self.membership.admitted]
        if not ready:
            return
        state = provider()
        body = encode_state(state)
        for pid in ready:
            first = self.membership.admitted[pid]
            log.warning("hivemind: rank %d sends its state at step %s to a joiner (paired from round %d)",
                        self.rank, state.get("step"), first)
            self.requests.answer(pid, pack({"ok": True, "from": first, "step": state.get("step"), "rank": self.rank}, body))

    async def on_state_request(self, peer_id: str) -> bytes:
        """Runs on the node's loop (handler): hold a joiner's request until `serve_state` answers it."""
        if not self.active or not self.membership.serving:
            return pack({"ok": False, "error": "this peer is not training yet"})
        self.membership.requests.add(peer_id)
        return await self.requests.wait(peer_id, 4 * self.cfg.matchmaking_time)

    def activate(self) -> None:
        """A joining peer takes part in collectives from its next one on (it adopts the group's round)."""
        if not self.active:
            self.membership.active, self.membership.joining = True, False
            self.joining = False
            self.rounds.adopt_next = True
            self.membership.publish()
            self.refresh()
            self.world_size = len(self.peers())  # until the next collective says otherwise

    # -- collectives (through the leader, see rounds) ---------------------------------
    def _collective(self, kind: str, header: dict, body: bytes) -> tuple[dict, bytes]:
        if not self.active:
            return self.rounds.solo(kind, header, body)
        result_header, result_body = self.rounds.run(kind, header, body)
        self.world_size = max(1, len(result_header["ranks"]))
        return result_header, result_body

    def _all_reduce(self, flat: torch.Tensor, op: str) -> Callable[[float | None], None]:
        header = {**tensor_header(flat), "op": "sum" if op == "mean" else op}
        rh, rb = self._collective(f"reduce:{header['op']}", header, tensor_bytes(flat))
        try:
            got = decode_tensor(rh, rb, like=flat, finite=False)
        except WireError as e:
            raise CommError(f"all_reduce: the leader sent a bad result ({e})") from None
        flat.copy_(got)
        return lambda _timeout: None

    def _broadcast(self, flat: torch.Tensor, src: int) -> Callable[[float | None], None]:
        header = {**tensor_header(flat), "root": src}
        body = tensor_bytes(flat) if self.rank == src else b""
        rh, rb = self._collective("broadcast", header, body)
        if self.rank != src:
            try:
                flat.copy_(decode_tensor(rh, rb, like=flat))
            except WireError as e:
                raise BadPeerData(src, str(e)) from None
        return lambda _timeout: None

    def _barrier(self) -> None:
        self._collective("gather", {}, b"")

    def _all_gather_bytes(self, payload: bytes) -> list[bytes]:
        rh, rb = self._collective("gather", {}, payload)
        try:
            items = unpack_list(rb, len(rh["ranks"]))
        except WireError as e:
            raise CommError(f"all_gather_bytes: the leader sent a bad result ({e})") from None
        # Indexed by rank, as the interface promises; a rank that is not in the round (gone,
        # dropped, never was) has an empty payload.
        out = [b""] * (1 + max(rh["ranks"], default=-1))
        for rank, item in zip(rh["ranks"], items):
            out[rank] = item
        return out

    # -- exchange: direct p2p ---------------------------------------------------------------
    def _exchange(self, flat: torch.Tensor, peer: int, tag: int) -> Callable[[float | None], torch.Tensor]:
        pid = self.peer_of(peer)
        if pid is None:
            raise PeerTimeout(f"peer {peer} is not a live member of run {self.cfg.run_id!r}")
        inbox = self.rounds.mailbox(peer, tag)
        frame = pack({"op": "x", "src": self.rank, "tag": tag, **tensor_header(flat)}, tensor_bytes(flat))
        sent = self.rounds.send_async(pid, frame)

        def finish(timeout: float | None) -> torch.Tensor:
            limit = self.cfg.matchmaking_time if timeout is None else timeout
            deadline = time.monotonic() + limit
            try:
                reply = sent.result(max(0.0, deadline - time.monotonic()) + 0.1)
            except Exception as e:  # noqa: BLE001 - NodeError or timeout: the peer did not take it
                self.rounds.forget(peer, tag)
                raise PeerTimeout(f"exchange with peer {peer} (tag {tag}): {e}") from None
            header, _ = unpack(reply)
            if not header.get("ok"):
                self.rounds.forget(peer, tag)
                raise CommError(f"peer {peer} refused exchange: {header.get('error')}")
            try:
                h, body = self._await_message(inbox, pid, deadline)
            except concurrent.futures.TimeoutError:
                raise PeerTimeout(f"peer {peer} did not answer within {limit:.1f}s (tag {tag})") from None
            except PeerTimeout as e:
                raise PeerTimeout(f"peer {peer} {e} (tag {tag})") from None
            finally:
                self.rounds.forget(peer, tag)
            try:
                return decode_tensor(h, body, like=flat)
            except WireError as e:
                self.mark_bad(pid, str(e))
                raise BadPeerData(peer, str(e)) from None

        return finish

    def _await_message(self, inbox: concurrent.futures.Future, pid: str, deadline: float) -> tuple[dict, bytes]:
        """The peer's message, or an error once the deadline passes or the peer has left the run
        (its record lapsed or said so, or it was seen dead or bad): a peer that is gone will not send."""
        while True:
            remaining = deadline - time.monotonic()
            try:
                return inbox.result(max(0.0, min(remaining, self.cfg.heartbeat)))
            except concurrent.futures.TimeoutError:
                if remaining <= self.cfg.heartbeat:
                    raise
                if not self.membership.present(pid):
                    raise PeerTimeout("left the run before sending") from None

    def exchange(self, tensors: Sequence[torch.Tensor], peer: int, *, tag: int = 0, timeout: float | None = None,
                 async_op: bool = False) -> list[torch.Tensor] | Handle:
        try:
            return super().exchange(tensors, peer, tag=tag, timeout=timeout, async_op=async_op)
        except BadPeerData as e:
            pid = self.members.get(e.peer)
            if pid is not None:
                self.mark_bad(pid, e.reason)
            raise

    # -- lifecycle ------------------------------------------------------------------------------
    def close(self) -> None:
        if getattr(self, "_closed", False):
            return
        self._closed = True
        self._stop.set()
        if self._beat is not None:
            self._beat.join(timeout=5)
        node = getattr(self, "node", None)
        if node is None:
            return
        try:
            self.membership.leave(timeout=5.0)
        except Exception:  # noqa: BLE001 - best effort on the way out (a TimeoutError included)
            pass
        if node.rejected:
            log.warning("hivemind: rank %d ignored %d messages/records from %d peers without this run's key: %s",
                        self.rank, sum(node.rejected.values()), len(node.rejected),
                        ", ".join(f"{p[:16]}..x{n}" for p, n in sorted(node.rejected.items())))
        node.close()
