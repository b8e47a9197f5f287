"""Who is in a hivemind run: DHT heartbeat records, ranks, and which peers take part in which round.

Every peer publishes one record (see `Membership.record`) under the run's members key, every
heartbeat; a record lives 4 heartbeats, and a closing peer publishes ``active: false``.

Rounds of a schedule every peer computes alone (NoLoCo's pairing) need the same member list on
every peer. `peers_in_round(r)` fixes it the first time it is asked (so the φ and Δ exchanges of a
round use one list) from the active peers whose ``from`` round is <= r. A joiner enters at a
round ``F`` that no survivor has fixed yet:

1. the joiner publishes ``joining: true`` and asks a live peer (the server) for its state;
2. every survivor that sees it acknowledges in its own record (``acks[joiner] = h``, h the
   highest round it has fixed) and from then on fixes at most round h + 1 until it learns F;
3. once every live survivor has acknowledged, the server sets F = max(acks, its own h) + 2,
   publishes it (``admits[joiner] = F``) and, at its loop's next step boundary, sends the
   joiner its state (`serve_state`); the joiner is paired from round F on.

A survivor therefore waits only for the DHT to carry an admission (a heartbeat or two), never for
a peer that is not in its round; a joiner that vanishes mid-way is dropped when its record lapses.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

KEEP_ROUNDS = 64  # fixed rounds remembered (a peer never asks for one this far behind)
POLL_S = 0.05


class Membership:
    def __init__(self, node: Any, *, heartbeat: float, patience: float, collective_round: Callable[[], int]) -> None:
        self.node = node  # publish(record, ttl) and records() -> {peer id: record}
        self.peer_id: str = node.peer_id
        self.heartbeat, self.patience = heartbeat, patience
        self._collective_round = collective_round
        self.rank = -1
        # False until the comm knows whether this peer joins a run under way: a record that said
        # "active, from round 0" even for a moment would put a joiner into rounds it is not in.
        self.active = False
        self.joining = False  # asking for state: survivors acknowledge
        self.serving = False  # the training loop has started (a newcomer then joins)
        self.from_round = 0  # the first round this peer is paired in
        self.members: dict[int, str] = {}  # rank -> peer id of live active peers (self included)
        self.dead: set[str] = set()  # peer ids seen gone; never readmitted (a restart gets a new id)
        self.bad: set[str] = set()  # peer ids that sent bad data; dropped for the rest of the run
        self.recs: dict[str, dict] = {}  # last read: peer id -> record
        self.horizon = -1  # highest round fixed by peers_in_round
        self.acks: dict[str, int] = {}  # joiner -> our horizon when we first saw it
        self.admitted: dict[str, int] = {}  # joiner -> its first round F
        self.requests: set[str] = set()  # joiners whose state request this peer holds
        self._fixed: dict[int, list[int]] = {}
        self._given_up: set[str] = set()
        self._lock = threading.Lock()

    # -- own record -------------------------------------------------------------------------
    def record(self) -> dict[str, Any]:
        return {"rank": self.rank, "active": self.active, "round": self._collective_round(), "joining": self.joining,
                "serving": self.serving, "from": self.from_round, "horizon": self.horizon,
                "acks": dict(self.acks), "admits": {p: f for p, f in self.admitted.items() if p in self.requests}}

    def publish(self) -> None:
        self.node.publish(self.record(), ttl=4 * self.heartbeat)

    def leave(self, *, timeout: float | None = None) -> None:
        """Say we left (as long-lived as a beat: the DHT keeps, per peer, the record that expires last);
        ``timeout`` bounds the store (a peer shutting down must not hang on peers that are gone)."""
        self.active, self.joining = False, False
        if self.rank >= 0:
            self.node.publish(self.record(), ttl=4 * self.heartbeat, timeout=timeout)

    # -- reading ------------------------------------------------------------------------------
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
        changed = False
        with self._lock:
            self.members, self.recs = live, recs
            for pid, rec in recs.items():
                for joiner, first in _int_map(rec.get("admits")).items():
                    self.admitted.setdefault(joiner, first)
                if rec.get("active") and rec.get("from", 0) > 0:
                    self.admitted.setdefault(pid, int(rec["from"]))
                if pid != self.peer_id and rec.get("joining") and pid not in self.acks and pid not in self.admitted:
                    self.acks[pid] = self.horizon
                    changed = True
            gone = [p for p in self.acks if p not in recs or p in self.admitted
                    or not (recs[p].get("joining") or recs[p].get("active"))]
            for p in gone:
                del self.acks[p]
                changed = True
            changed |= self._decide()
        if changed:
            self.publish()
        return recs

    def _decide(self) -> bool:
        """Admit each joiner whose request we hold once every live survivor has acknowledged it."""
        decided = False
        for joiner in sorted(self.requests - set(self.admitted)):
            survivors = [p for p in self.members.values() if p not in (self.peer_id, joiner)]
            seen = [_int_map(self.recs.get(p, {}).get("acks")).get(joiner) for p in survivors]
            if joiner not in self.recs or any(a is None for a in seen):
                continue
            self.admitted[joiner] = max([self.horizon, *seen]) + 2
            decided = True
        return decided

    def present(self, pid: str) -> bool:
        """``pid`` is an active member or an admitted joiner still starting up."""
        return pid in self.members.values() or (pid in self.admitted and pid in self.recs and pid not in self.dead | self.bad)

    def peer_of(self, rank: int) -> str | None:
        pid = self.members.get(rank)
        if pid is None:
            pid = next((p for p in self.admitted if self.present(p) and self.recs[p].get("rank") == rank), None)
        return pid

    # -- rounds ---------------------------------------------------------------------------------
    def peers_in_round(self, round_: int) -> list[int]:
        """The ranks paired in ``round_``: fixed at the first call, the same list on every peer of the round."""
        if not self.active:  # a joiner before activate(): alone, and nothing fixed yet
            return [self.rank]
        waited_since = None
        while True:
            with self._lock:
                if round_ in self._fixed:
                    return list(self._fixed[round_])
                pending = [p for p, a in self.acks.items() if round_ > a + 1 and p not in self._given_up]
                if not pending:
                    ranks = self._compose(round_)
                    self._fixed[round_] = ranks
                    self.horizon = max(self.horizon, round_)
                    for old in [r for r in self._fixed if r < self.horizon - KEEP_ROUNDS]:
                        del self._fixed[old]
                    return list(ranks)
            waited_since = waited_since or time.monotonic()
            if time.monotonic() - waited_since > self.patience:
                log.warning("hivemind: rank %d fixes round %d without joiners %s (no admission within %.0fs)",
                            self.rank, round_, [p[:12] for p in pending], self.patience)
                self._given_up.update(pending)
                continue
            time.sleep(POLL_S)
            self.refresh()

    def _compose(self, round_: int) -> list[int]:
        if not self.active or self.from_round > round_:
            return [self.rank]
        ranks = {self.rank}
        for pid, rec in self.recs.items():
            if pid == self.peer_id or pid in self.dead or pid in self.bad or pid in self._given_up:
                continue
            first = self.admitted.get(pid, 0 if rec.get("active") and not rec.get("from") else None)
            if rec.get("active") or pid in self.admitted:
                if first is not None and first <= round_ and self.members.get(rec["rank"], pid) == pid:
                    ranks.add(int(rec["rank"]))
        return sorted(ranks)

    # -- start-up ---------------------------------------------------------------------------------
    def claim_rank(self) -> int:
        """1 + the highest rank among live records; ties go to the smaller peer id (the loser re-claims)."""
        while True:
            taken = [rec["rank"] for pid, rec in self.node.records().items() if pid != self.peer_id]
            rank = 1 + max(taken, default=-1)
            self.node.publish({"rank": rank, "active": False, "round": 0}, ttl=4 * self.heartbeat)
            time.sleep(min(0.5, self.heartbeat))
            rivals = [pid for pid, rec in self.node.records().items() if rec["rank"] == rank and pid != self.peer_id]
            if all(self.peer_id < pid for pid in rivals):
                return rank

    def run_in_progress(self) -> bool:
        recs = self.node.records()
        return any(rec.get("active") and (int(rec.get("round", 0)) > 0 or rec.get("serving"))
                   for pid, rec in recs.items() if pid != self.peer_id)

    def mark_dead(self, peer_id: str) -> None:
        if peer_id != self.peer_id:
            self.dead.add(peer_id)
            self.members = {r: p for r, p in self.members.items() if p != peer_id}

    def mark_bad(self, peer_id: str, reason: str) -> None:
        if peer_id != self.peer_id and peer_id not in self.bad:
            log.warning("hivemind: dropping peer %s.. for bad data: %s", peer_id[:12], reason)
            self.bad.add(peer_id)
            self.members = {r: p for r, p in self.members.items() if p != peer_id}


def _int_map(value: Any) -> dict[str, int]:
    if not isinstance(value, dict):
        return {}
    return {k: v for k, v in value.items() if isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool)}
