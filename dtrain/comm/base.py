"""The one communication interface every algorithm talks to.

Algorithms never import torch.distributed or hivemind; they receive a `Comm`.
Counters live here, in the backend, so every algorithm is measured the same way.

Byte accounting (the cost model every backend uses, documented so that figures
from different backends compare):

- ``payload_bytes``: bytes of the caller's own data handed to the backend.
- ``bytes_sent`` / ``bytes_recv``: bytes this worker puts on / takes off the
  wire. all_reduce counts a ring all-reduce, 2(N-1)/N of the buffer each way;
  exchange counts the buffer once each way; all_gather_bytes counts the payload
  once to each of the N-1 others; broadcast counts the buffer N-1 times out of
  the source and once into every other worker.
- ``messages``: point-to-point messages sent by this worker.
- ``collectives``: all_reduce, broadcast, barrier and all_gather_bytes calls.
- ``blocked_s``: seconds the caller spent waiting on communication (inside a
  blocking call or inside ``Handle.wait``).
"""

from __future__ import annotations

import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

REDUCE_OPS = ("mean", "sum", "min", "max")


class CommError(RuntimeError):
    """A communication call failed (peer gone, transport closed)."""


class PeerTimeout(CommError):
    """A peer did not answer within the timeout; the caller may skip it for this round."""


class BadPeerData(CommError):
    """A peer sent data that failed validation (shape, dtype, non-finite, length)."""

    def __init__(self, peer: int, reason: str) -> None:
        super().__init__(f"peer {peer} sent bad data: {reason}")
        self.peer = peer
        self.reason = reason


@dataclass
class CommStats:
    bytes_sent: int = 0
    bytes_recv: int = 0
    payload_bytes: int = 0
    messages: int = 0
    collectives: int = 0
    blocked_s: float = 0.0

    def as_dict(self) -> dict[str, float]:
        return asdict(self)

    def copy(self) -> CommStats:
        return CommStats(**asdict(self))

    def __sub__(self, other: CommStats) -> CommStats:
        a, b = asdict(self), asdict(other)
        return CommStats(**{k: a[k] - b[k] for k in a})


class Handle:
    """Result of a non-blocking call. ``wait()`` blocks (time counted) and returns the result."""

    def __init__(self, stats: CommStats, finish: Callable[[float | None], Any]) -> None:
        self._stats = stats
        self._finish = finish
        self._done = False
        self._result: Any = None

    def wait(self, timeout: float | None = None) -> Any:
        if not self._done:
            start = time.perf_counter()
            try:
                self._result = self._finish(timeout)
            finally:
                self._stats.blocked_s += time.perf_counter() - start
            self._done = True
        return self._result


def flat_nbytes(tensors: Sequence[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def ring_allreduce_bytes(nbytes: int, world_size: int) -> int:
    return 0 if world_size <= 1 else math.ceil(2 * (world_size - 1) * nbytes / world_size)


def check_received(peer: int, got: torch.Tensor, like: torch.Tensor, *, finite: bool = True) -> None:
    """Validate a tensor that arrived from ``peer`` against the local one it must match."""
    if got.shape != like.shape:
        raise BadPeerData(peer, f"shape {tuple(got.shape)} != expected {tuple(like.shape)}")
    if got.dtype != like.dtype:
        raise BadPeerData(peer, f"dtype {got.dtype} != expected {like.dtype}")
    if finite and got.is_floating_point() and not bool(torch.isfinite(got).all()):
        raise BadPeerData(peer, "non-finite values")


class Comm(ABC):
    """A group of workers. Ranks are integers; ``peers()`` lists the live ones (self included)."""

    rank: int
    world_size: int

    def __init__(self) -> None:
        self.stats = CommStats()

    # -- membership -----------------------------------------------------------
    def peers(self) -> list[int]:
        """Live workers, sorted, self included. Elastic backends may change it between calls."""
        return list(range(self.world_size))

    # -- collectives ----------------------------------------------------------
    @abstractmethod
    def _all_reduce(self, flat: torch.Tensor, op: str) -> Callable[[float | None], None]:
        """Start an in-place reduction of ``flat``; return a finisher that blocks until done."""

    def all_reduce(self, tensors: Sequence[torch.Tensor], op: str = "mean", *, async_op: bool = False) -> Handle | None:
        """Reduce ``tensors`` in place across all workers (one fused buffer, one collective)."""
        if op not in REDUCE_OPS:
            raise ValueError(f"all_reduce op must be one of {REDUCE_OPS}, got {op!r}")
        tensors = _same_dtype(tensors)
        nbytes = flat_nbytes(tensors)
        self.stats.collectives += 1
        self.stats.payload_bytes += nbytes
        wire = ring_allreduce_bytes(nbytes, self.world_size)
        self.stats.bytes_sent += wire
        self.stats.bytes_recv += wire
        self.stats.messages += 2 * (self.world_size - 1)
        if self.world_size == 1 or not tensors:
            return self._completed(async_op)
        flat = _flatten(tensors)
        finish_reduce = self._timed(lambda: self._all_reduce(flat, op))

        def finish(timeout: float | None) -> None:
            finish_reduce(timeout)
            if op == "mean":
                flat.div_(self.world_size)
            _unflatten_into(flat, tensors)

        return self._run(finish, async_op)

    @abstractmethod
    def _broadcast(self, flat: torch.Tensor, src: int) -> Callable[[float | None], None]:
        """Start an in-place broadcast of ``flat`` from ``src``; return a blocking finisher."""

    def broadcast(self, tensors: Sequence[torch.Tensor], src: int, *, async_op: bool = False) -> Handle | None:
        """Overwrite ``tensors`` on every worker with ``src``'s values."""
        tensors = _same_dtype(tensors)
        nbytes = flat_nbytes(tensors)
        self.stats.collectives += 1
        others = self.world_size - 1
        if self.rank == src:
            self.stats.payload_bytes += nbytes
            self.stats.bytes_sent += nbytes * others
            self.stats.messages += others
        else:
            self.stats.bytes_recv += nbytes
        if self.world_size == 1 or not tensors:
            return self._completed(async_op)
        flat = _flatten(tensors)
        finish_bcast = self._timed(lambda: self._broadcast(flat, src))

        def finish(timeout: float | None) -> None:
            finish_bcast(timeout)
            if self.rank != src:
                _unflatten_into(flat, tensors)

        return self._run(finish, async_op)

    @abstractmethod
    def _barrier(self) -> None: ...

    def barrier(self) -> None:
        self.stats.collectives += 1
        self._timed(self._barrier)

    @abstractmethod
    def _all_gather_bytes(self, payload: bytes) -> list[bytes]: ...

    def all_gather_bytes(self, payload: bytes) -> list[bytes]:
        """Every worker's ``payload`` (tiny messages), indexed by rank. Never unpickled."""
        if not isinstance(payload, (bytes, bytearray)):
            raise TypeError(f"all_gather_bytes takes bytes, got {type(payload).__name__}")
        payload = bytes(payload)
        self.stats.collectives += 1
        self.stats.payload_bytes += len(payload)
        others = self.world_size - 1
        self.stats.bytes_sent += len(payload) * others
        self.stats.messages += others
        if self.world_size == 1:
            return [payload]
        out = self._timed(lambda: self._all_gather_bytes(payload))
        self.stats.bytes_recv += sum(len(p) for i, p in enumerate(out) if i != self.rank)
        return out

    # -- point to point -------------------------------------------------------
    @abstractmethod
    def _exchange(self, flat: torch.Tensor, peer: int, tag: int) -> Callable[[float | None], torch.Tensor]:
        """Start sending ``flat`` to ``peer`` and receiving a same-shaped buffer; return finisher."""

    def exchange(
        self,
        tensors: Sequence[torch.Tensor],
        peer: int,
        *,
        tag: int = 0,
        timeout: float | None = None,
        async_op: bool = False,
    ) -> list[torch.Tensor] | Handle:
        """Send mine to ``peer`` and receive the peer's tensors of the same shapes and dtypes.

        Both sides must call with the same ``tag`` (use a round number so a late message of an
        abandoned round never lands in a later one). Returns new tensors; the inputs are untouched.
        Raises PeerTimeout after ``timeout`` seconds and BadPeerData for a malformed or
        non-finite reply.
        """
        if peer == self.rank:
            raise ValueError("exchange with oneself")
        tensors = _same_dtype(tensors)
        nbytes = flat_nbytes(tensors)
        self.stats.payload_bytes += nbytes
        self.stats.bytes_sent += nbytes
        self.stats.messages += 1
        flat = _flatten(tensors)
        finish_exchange = self._timed(lambda: self._exchange(flat, peer, tag))

        def finish(timeout_: float | None) -> list[torch.Tensor]:
            got = finish_exchange(timeout if timeout_ is None else timeout_)
            check_received(peer, got, flat)
            self.stats.bytes_recv += nbytes
            return _split_like(got, tensors)

        if async_op:
            return Handle(self.stats, finish)
        return self._timed(lambda: finish(timeout))

    # -- lifecycle --------------------------------------------------------------
    def close(self) -> None:
        """Release transport resources. Safe to call twice."""

    def __enter__(self) -> Comm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- helpers ------------------------------------------------------------------
    def _timed(self, fn: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        try:
            return fn()
        finally:
            self.stats.blocked_s += time.perf_counter() - start

    def _run(self, finish: Callable[[float | None], Any], async_op: bool) -> Handle | None:
        handle = Handle(self.stats, finish)
        if async_op:
            return handle
        handle.wait()
        return None

    def _completed(self, async_op: bool) -> Handle | None:
        return Handle(self.stats, lambda _t: None) if async_op else None


def _same_dtype(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    tensors = list(tensors)
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) > 1:
        raise TypeError(f"tensors in one call must share a dtype, got {sorted(map(str, dtypes))}")
    return tensors


def _flatten(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """One contiguous buffer so a call is one transfer, not one per tensor."""
    if len(tensors) == 1:
        return tensors[0].detach().reshape(-1).clone()
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def _unflatten_into(flat: torch.Tensor, tensors: Sequence[torch.Tensor]) -> None:
    offset = 0
    with torch.no_grad():
        for t in tensors:
            n = t.numel()
            t.copy_(flat[offset : offset + n].view_as(t))
            offset += n


def _split_like(flat: torch.Tensor, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    out, offset = [], 0
    for t in tensors:
        n = t.numel()
        out.append(flat[offset : offset + n].view(t.shape))
        offset += n
    return out
