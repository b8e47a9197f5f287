"""The run key: peers prove they hold a shared secret, and every message and record is authenticated.

HMAC-SHA256 from Python's `hmac`/`hashlib`; no cryptography of our own. Two keys are derived
from the secret and the run id (one for messages, one for DHT membership records), so a MAC made
for one run or one purpose never verifies for another.

A sealed message is ``MAGIC | u32 envelope length | envelope JSON | MAC | frame`` where the
envelope names the run, the sender and the receiver peer ids, the sender's sequence number and,
for a reply, the sequence number of the request it answers. The MAC covers the envelope and the
whole frame (header with op, round, tag, and the payload), so a message cannot be altered, sent
to another peer, replayed into another round or run, or answer another request. The transport
(libp2p) authenticates peer ids, and the receiver checks that the envelope's sender is the peer
the message came from, so a captured message cannot be sent from anywhere else; `ReplayGuard`
refuses a sequence number seen before.

Membership records carry ``until`` (their DHT expiration) and ``mac`` over (peer id, until, record):
a record from a peer without the key is ignored, and a copied record cannot outlive its own
expiration or speak for another peer id.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import os
import threading
from dataclasses import dataclass
from typing import Any

MIN_KEY_BYTES = 16
MAGIC = b"DTA1"
MAC_BYTES = 32
MAX_ENVELOPE = 4096
REPLAY_WINDOW = 1 << 16  # sequence numbers this far below a sender's highest are refused outright


class AuthError(ValueError):
    """A message or record that does not verify under this run's key."""


def load_run_key(key_file: str, key_env: str) -> bytes | None:
    """The run key from ``comm.run_key_file`` or the variable named by ``comm.run_key_env``; None if neither is set."""
    if key_file and key_env:
        raise ValueError("set one of comm.run_key_file and comm.run_key_env, not both")
    if key_file:
        where = f"comm.run_key_file={key_file!r}"
        try:
            with open(key_file, "rb") as f:
                raw = f.read()
        except OSError as e:
            raise ValueError(f"{where} cannot be read ({e.strerror}); point it at a file that holds the run key") from None
    elif key_env:
        where = f"the environment variable {key_env} named by comm.run_key_env"
        raw = os.environ.get(key_env, "").encode()
    else:
        return None
    key = raw.strip()
    if not key:
        raise ValueError(f"{where} is empty or unset; put a random secret there (e.g. `openssl rand -hex 32`)")
    if len(key) < MIN_KEY_BYTES:
        raise ValueError(f"{where} holds a {len(key)}-byte run key; use at least {MIN_KEY_BYTES} bytes (e.g. `openssl rand -hex 32`)")
    return key


@dataclass(frozen=True)
class Opened:
    seq: int
    reply_to: int | None
    frame: bytes


class RunKey:
    """Seals and opens messages and signs and checks records for one run. Never prints the secret."""

    def __init__(self, secret: bytes, run_id: str) -> None:
        self.run_id = run_id
        self._msg = hmac.new(secret, b"dtrain/v1/messages/" + run_id.encode(), hashlib.sha256).digest()
        self._rec = hmac.new(secret, b"dtrain/v1/records/" + run_id.encode(), hashlib.sha256).digest()
        self._seq = itertools.count(1)

    def __repr__(self) -> str:
        return f"RunKey(run_id={self.run_id!r})"

    def next_seq(self) -> int:
        return next(self._seq)

    # -- messages ---------------------------------------------------------------------
    def seal(self, frame: bytes, *, sender: str, receiver: str, seq: int, reply_to: int | None = None) -> bytes:
        env = json.dumps({"run": self.run_id, "from": sender, "to": receiver, "seq": seq, "re": reply_to},
                         separators=(",", ":")).encode()
        head = MAGIC + len(env).to_bytes(4, "big") + env
        return head + hmac.new(self._msg, head + frame, hashlib.sha256).digest() + frame

    def open(self, sealed: bytes, *, sender: str, receiver: str) -> Opened:
        """The frame inside ``sealed`` if its MAC verifies and it was sent by ``sender`` to ``receiver`` in this run."""
        if len(sealed) < len(MAGIC) + 4 or sealed[: len(MAGIC)] != MAGIC:
            raise AuthError("message is not sealed with a run key")
        n = int.from_bytes(sealed[len(MAGIC) : len(MAGIC) + 4], "big")
        end = len(MAGIC) + 4 + n
        if n > MAX_ENVELOPE or end + MAC_BYTES > len(sealed):
            raise AuthError("sealed message is truncated")
        head, mac, frame = sealed[:end], sealed[end : end + MAC_BYTES], sealed[end + MAC_BYTES :]
        if not hmac.compare_digest(mac, hmac.new(self._msg, head + frame, hashlib.sha256).digest()):
            raise AuthError("message MAC does not verify (wrong run key, or altered)")
        env = json.loads(head[len(MAGIC) + 4 :].decode())  # authenticated, so it is our own JSON
        if env.get("run") != self.run_id or env.get("from") != sender or env.get("to") != receiver:
            raise AuthError("message was sealed for another run, sender or receiver")
        seq, re_ = env.get("seq"), env.get("re")
        if not isinstance(seq, int) or not (re_ is None or isinstance(re_, int)):
            raise AuthError("message envelope lacks a sequence number")
        return Opened(seq=seq, reply_to=re_, frame=frame)

    # -- membership records -------------------------------------------------------------
    def _record_mac(self, peer_id: str, record: dict[str, Any]) -> str:
        body = json.dumps({"pid": peer_id, "rec": record}, sort_keys=True, separators=(",", ":")).encode()
        return hmac.new(self._rec, body, hashlib.sha256).hexdigest()

    def sign_record(self, peer_id: str, record: dict[str, Any], until: float) -> dict[str, Any]:
        rec = {**record, "until": until}
        return {**rec, "mac": self._record_mac(peer_id, rec)}

    def verify_record(self, peer_id: str, record: dict[str, Any], expires: float) -> dict[str, Any]:
        """``record`` without its MAC if it verifies for ``peer_id`` and does not outlive its own ``until``."""
        mac = record.get("mac")
        rec = {k: v for k, v in record.items() if k != "mac"}
        if not isinstance(mac, str) or not hmac.compare_digest(mac, self._record_mac(peer_id, rec)):
            raise AuthError("membership record MAC does not verify")
        until = rec.get("until")
        if not isinstance(until, (int, float)) or expires > until + 1e-3:
            raise AuthError("membership record stored to outlive its signed expiration")
        return rec


class ReplayGuard:
    """Refuses a (sender, sequence number) seen before; remembers a bounded window per sender."""

    def __init__(self, window: int = REPLAY_WINDOW) -> None:
        self.window = window
        self._seen: dict[str, tuple[int, set[int]]] = {}
        self._lock = threading.Lock()

    def check(self, sender: str, seq: int) -> None:
        with self._lock:
            top, seen = self._seen.get(sender, (0, set()))
            if seq <= top - self.window or seq in seen:
                raise AuthError(f"message {seq} from this peer was seen before (replay)")
            seen.add(seq)
            top = max(top, seq)
            if len(seen) > 2 * self.window:
                seen = {s for s in seen if s > top - self.window}
            self._seen[sender] = (top, seen)
