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

A peer that starts while a run is under way (the DHT shows rounds already done) joins: see
`dtrain.comm.hivemind_join` for fetching state from a live peer. Until `activate()` its
collectives complete alone.

Shutdown: `close()` (also on SIGTERM, turned into SystemExit) stops the daemon; a watchdog
kills it if this process dies any other way (see `hivemind_node`).
"""

from __future__ import annotations

import concurrent.futures
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from dtrain.comm.base import BadPeerData, Comm, CommError, Handle, PeerTimeout
from dtrain.comm.hivemind_rounds import Rounds
from dtrain.comm.hivemind_wire import WireError, decode_tensor, pack, tensor_bytes, tensor_header, unpack

log = logging.getLogger(__name__)


@dataclass
class Config:
    name: str = "hivemind"
    initial_peers: list[str] = field(default_factory=list)  # multiaddrs of running peers; [] starts a new run
    run_id: str = "dtrain"  # keeps runs that share a DHT apart
    host_maddrs: list[str] = field(default_factory=lambda: ["/ip4/127.0.0.1/tcp/0"])  # where to listen
    announce_maddrs: list[str] = field(default_factory=list)  # public addresses to announce (behind NAT)
    rank: int = -1  # -1: claim one from the DHT (1 + highest seen)
    min_peers: int = 1  # wait for this many live peers before training starts
    join_timeout: float = 120.0  # seconds to wait for min_peers
    request_timeout: float = 3.0  # one RPC (send, ping); must be < matchmaking_time
    matchmaking_time: float = 30.0  # how long a round waits for a live but slow peer
    heartbeat: float = 1.0  # seconds between membership refreshes; a record lives 4 heartbeats
    state_dir: str = "${out_dir}"  # where this peer's checkpoints are, served to joining peers (the run's out_dir)
    maddr_file: str = ""  # if set, write this peer's multiaddrs here (one a line) once it listens


def validate(cfg: Config) -> None:
    if not cfg.run_id or any(c in cfg.run_id for c in "/ \t\n"):
        raise ValueError(f"comm.run_id must be a non-empty word without '/' or spaces, got {cfg.run_id!r}")
    if not cfg.host_maddrs:
        raise ValueError("comm.host_maddrs must list at least one address, e.g. [/ip4/0.0.0.0/tcp/31337]")
    for key in ("request_timeout", "matchmaking_time", "heartbeat", "join_timeout"):
        if getattr(cfg, key) <= 0:
            raise ValueError(f"comm.{key} must be > 0, got {getattr(cfg, key)}")
    if cfg.request_timeout >= cfg.matchmaking_time:
        raise ValueError(f"comm.request_timeout ({cfg.request_timeout}) must be < comm.matchmaking_time ({cfg.matchmaking_time})")
    if cfg.min_peers < 1:
        raise ValueError(f"comm.min_peers must be >= 1, got {cfg.min_peers}")
    if cfg.rank < -1:
        raise ValueError(f"comm.rank must be >= 0, or -1 to claim one, got {cfg.rank}")
    for addr in [*cfg.initial_peers, *cfg.host_maddrs]:
        if not str(addr).startswith("/"):
            raise ValueError(f"comm addresses must be multiaddrs like /ip4/1.2.3.4/tcp/31337/p2p/Qm..., got {addr!r}")


def connect(cfg: Config) -> HivemindComm:
    try:
        import hivemind  # noqa: F401
    except ImportError:
        raise CommError("comm.name=hivemind needs hivemind: pip install 'dtrain[hivemind]'") from None
    comm = HivemindComm(cfg)
    _exit_on_sigterm()
    if comm.joining:
        from dtrain.comm.hivemind_join import join

        root = _root_config(cfg)
        try:
            join(comm, out_dir=str(getattr(root, "out_dir", cfg.state_dir)), resume=bool(getattr(root, "resume", True)))
        except BaseException:
            comm.close()
            raise
    return comm


def _root_config(cfg: Config) -> object:
    """The whole run config around this comm section (OmegaConf keeps the parent), else None."""
    get_parent = getattr(cfg, "_get_parent", None)
    return get_parent() if callable(get_parent) else None


def _exit_on_sigterm() -> None:
    """SIGTERM -> SystemExit in the main thread, so `finally: comm.close()` runs (no orphaned p2pd)."""
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))


class HivemindComm(Comm):
    def __init__(self, cfg: Config) -> None:
        super().__init__()
        from dtrain.comm.hivemind_node import Node

        validate(cfg)
        self.cfg = cfg
        self.rounds = Rounds(self)
        self.node = Node(
            run_id=cfg.run_id, initial_peers=list(cfg.initial_peers), host_maddrs=list(cfg.host_maddrs),
            announce_maddrs=list(cfg.announce_maddrs), handler=self.rounds.handle,
        )
        self.peer_id = self.node.peer_id
        self.members: dict[int, str] = {}  # rank -> peer id of live peers (self included)
        self.dead: set[str] = set()  # peer ids seen gone; never readmitted (a restart gets a new id)
        self.bad: set[str] = set()  # peer ids that sent bad data; dropped for the rest of the run
        self.active = True
        self.rank = -1
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None
        try:
            if cfg.maddr_file:
                with open(cfg.maddr_file, "w") as f:
                    f.write("\n".join(self.node.visible_maddrs()) + "\n")
            self.rank = cfg.rank if cfg.rank >= 0 else self._claim_rank()
            self.publish()
            self.joining = self._run_in_progress()
            self.active = not self.joining
            self.publish()
            self._beat = threading.Thread(target=self._heartbeat, name="hivemind-comm-heartbeat", daemon=True)
            self._beat.start()
            self._wait_for_peers()
        except BaseException:
            self.close()
            raise
        self.world_size = len(self.peers())
        log.warning("hivemind peer rank %d: %s", self.rank, " ".join(self.node.visible_maddrs()))

    # -- membership ---------------------------------------------------------------------
    def record(self) -> dict[str, object]:
        return {"rank": self.rank, "active": self.active, "round": self.rounds.next_round}

    def publish(self) -> None:
        self.node.publish(self.record(), ttl=4 * self.cfg.heartbeat)

    def refresh(self) -> dict[str, dict]:
        recs = self.node.records()
        live: dict[int, str] = {}
        for pid, rec in recs.items():
            if pid in self.dead or pid in self.bad or not rec.get("active", False):
                continue
            r = rec["rank"]
            if r not in live or pid < live[r]:
                live[r] = pid
        if self.active and self.rank >= 0:
            live[self.rank] = self.peer_id
        self.members = live
        return recs

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.cfg.heartbeat):
            try:
                self.publish()
                self.refresh()
            except Exception as e:  # noqa: BLE001 - a missed beat is retried; the DHT may be shutting down
                log.debug("hivemind heartbeat failed: %s", e)

    def _claim_rank(self) -> int:
        while True:
            taken = [rec["rank"] for pid, rec in self.node.records().items() if pid != self.peer_id]
            rank = 1 + max(taken, default=-1)
            self.node.publish({"rank": rank, "active": False, "round": 0}, ttl=4 * self.cfg.heartbeat)
            time.sleep(min(0.5, self.cfg.heartbeat))
            rivals = [pid for pid, rec in self.node.records().items() if rec["rank"] == rank and pid != self.peer_id]
            if all(self.peer_id < pid for pid in rivals):
                return rank

    def _run_in_progress(self) -> bool:
        recs = self.node.records()
        return any(rec.get("active") and int(rec.get("round", 0)) > 0 for pid, rec in recs.items() if pid != self.peer_id)

    def _wait_for_peers(self) -> None:
        deadline = time.monotonic() + self.cfg.join_timeout
        while True:
            self.refresh()
            if self.joining or len(self.members) >= self.cfg.min_peers:
                return
            if time.monotonic() > deadline:
                raise CommError(f"only {len(self.members)} of comm.min_peers={self.cfg.min_peers} peers joined within "
                                f"{self.cfg.join_timeout}s; check comm.initial_peers or lower comm.min_peers")
            time.sleep(0.2)

    def peers(self) -> list[int]:
        return sorted(self.members) if self.active else [self.rank]

    def peer_of(self, rank: int) -> str | None:
        pid = self.members.get(rank)
        if pid is None:
            self.refresh()
            pid = self.members.get(rank)
        return pid

    def rank_of(self, peer_id: str) -> int | None:
        return next((r for r, p in self.members.items() if p == peer_id), None)

    def mark_dead(self, peer_id: str) -> None:
        if peer_id != self.peer_id:
            self.dead.add(peer_id)
            self.members = {r: p for r, p in self.members.items() if p != peer_id}

    def mark_bad(self, peer_id: str, reason: str) -> None:
        if peer_id != self.peer_id and peer_id not in self.bad:
            log.warning("hivemind: dropping peer %s.. for bad data: %s", peer_id[:12], reason)
            self.bad.add(peer_id)
            self.members = {r: p for r, p in self.members.items() if p != peer_id}

    def activate(self) -> None:
        """A joining peer takes part in collectives from its next one on (it adopts the group's round)."""
        if not self.active:
            self.active = True
            self.rounds.adopt_next = True
            self.publish()
            self.refresh()

    # -- collectives (through the leader, see hivemind_rounds) ---------------------------------
    def activate_after_resume(self, step: int) -> None:
        """Join the group's rounds right after the loop's resume agreement on ``step`` (see hivemind_join)."""
        self._resume_marker = float(step)

    def all_reduce(self, tensors: Sequence[torch.Tensor], op: str = "mean", *, async_op: bool = False) -> Handle | None:
        if self.active:
            return super().all_reduce(tensors, op, async_op=async_op)
        # Joining, not yet in the group: a collective of one leaves the tensors as they are.
        tensors = list(tensors)
        self.stats.collectives += 1
        marker = getattr(self, "_resume_marker", None)
        if marker is not None and op == "min" and len(tensors) == 1 and tensors[0].numel() == 1:
            if float(tensors[0].reshape(-1)[0]) == marker:
                self.activate()
        return self._completed(async_op)

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
        from dtrain.comm.hivemind_wire import unpack_list

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
                if pid not in self.members.values():
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
        try:
            if self.rank >= 0:  # as long-lived as a beat: the DHT keeps, per peer, the record that expires last
                self.node.publish({"rank": self.rank, "active": False, "round": self.rounds.next_round},
                                  ttl=4 * self.cfg.heartbeat)
        except Exception:  # noqa: BLE001 - best effort on the way out
            pass
        self.node.close()
