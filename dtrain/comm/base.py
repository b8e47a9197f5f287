"""The one communication interface every algorithm talks to.

Algorithms never import torch.distributed or hivemind; they receive a `Comm`.
Counters live here, in the backend, so every algorithm is measured the same way.

Byte accounting (the cost model every backend uses, documented so that figures
from different backends compare):

- ``payload_bytes``: bytes of the caller's own data handed to the backend.
- ``bytes_sent`` / ``bytes_recv``: bytes this worker puts on / takes off the
  wire. all_reduce counts a ring all-reduce, 2(N-1)/N of the buffer each way;
  exchange counts the buffer once each way; all_gather_bytes counts the payload
  once to each of the N-1 others (so does all_gather, which rides on it);
  broadcast counts the buffer N-1 times out of the source and once into every
  other worker.
- Compressed outer updates (`dtrain.algorithms.compress`): codecs whose payloads
  an all-reduce can sum (none, bf16) go through all_reduce in the wire dtype;
  the others (int8, int4, topk: scales, packed codes and indices) cannot be
  summed on the wire, so every worker all-gathers the encoded payloads and
  decodes and sums them locally in fp32. A worker then sends its c payload
  bytes to each of the N-1 others, (N-1)·c, against 2(N-1)/N·b for a ring
  all-reduce of the b uncompressed bytes: a codec saves bytes when c < 2b/N.
- ``messages``: point-to-point messages sent by this worker.
- ``collectives``: all_reduce, broadcast, barrier and all_gather_bytes calls; an all_reduce or
  broadcast of mixed dtypes runs (and counts) one collective per dtype group, each counted as
  above on that group's bytes. exchange and all_gather move mixed dtypes in one message.
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

# flatten and dtype grouping live in dtrain.comm.flat (flat_nbytes is re-exported for existing callers)
from dtrain.comm.flat import flat_nbytes, group_by_dtype, pack, unpack
from dtrain.comm.flat import flatten as _flatten
from dtrain.comm.received import BadPeerData, CommError, PeerTimeout, check_received  # noqa: F401 - re-exported
from dtrain.comm.received import unpack_checked as _unpack_checked
from dtrain.comm.flat import unflatten_into as _unflatten_into

REDUCE_OPS = ("mean", "sum", "min", "max")


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

    def __add__(self, other: CommStats) -> CommStats:
        a, b = asdict(self), asdict(other)
        return CommStats(**{k: a[k] + b[k] for k in a})


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


def ring_allreduce_bytes(nbytes: int, world_size: int) -> int:
    return 0 if world_size <= 1 else math.ceil(2 * (world_size - 1) * nbytes / world_size)


class Comm(ABC):
    """A group of workers. Ranks are integers; ``peers()`` lists the live ones (self included)."""

    rank: int
    world_size: int
    # Hierarchical workers (dtrain.hierarchy): the k processes that together hold this worker's
    # model (fast links); this comm then links process i of every worker (slow links). DTensors
    # passed to any call travel as their local shards (dtrain.comm.flat.local).
    inner_comm: Comm | None = None

    def __init__(self) -> None:
        self.stats = CommStats()

    # -- membership -----------------------------------------------------------
    def peers(self) -> list[int]:
        """Live workers, sorted, self included. Elastic backends may change it between calls."""
        return list(range(self.world_size))

    def peers_in_round(self, round_: int) -> list[int]:
        """The workers of round ``round_`` of a schedule each worker computes alone (NoLoCo's pairing):
        the same list on every worker of that round. Elastic backends fix it per round; others: peers()."""
        return self.peers()

    # -- joining a run under way (elastic backends; no-ops here) ----------------
    def fetch_state(self) -> dict[str, Any] | None:
        """A live peer's current run state if this worker joins a run under way, else None."""
        return None

    def serve_state(self, provider: Callable[[], dict[str, Any]]) -> None:
        """Call at every step boundary: answers workers waiting to join with ``provider()`` (the live
        state, taken on the caller's thread); never calls it when none waits."""

    def activate(self) -> None:
        """This worker's state is loaded: from now on it takes part in the group's rounds."""

    # -- collectives ----------------------------------------------------------
    @abstractmethod
    def _all_reduce(self, flat: torch.Tensor, op: str) -> Callable[[float | None], None]:
        """Start an in-place reduction of ``flat``; return a finisher that blocks until done."""

    def all_reduce(self, tensors: Sequence[torch.Tensor], op: str = "mean", *, async_op: bool = False) -> Handle | None:
        """Reduce ``tensors`` in place across all workers: one fused buffer and one collective per
        dtype (mixed fp32/bf16 models reduce each dtype in its own precision, never cast)."""
        if op not in REDUCE_OPS:
            raise ValueError(f"all_reduce op must be one of {REDUCE_OPS}, got {op!r}")
        return self._per_dtype(tensors, lambda group: self._start_all_reduce(group, op), async_op)

    def _start_all_reduce(self, tensors: list[torch.Tensor], op: str) -> Callable[[float | None], None] | None:
        nbytes = flat_nbytes(tensors)
        self.stats.collectives += 1
        self.stats.payload_bytes += nbytes
        wire = ring_allreduce_bytes(nbytes, self.world_size)
        self.stats.bytes_sent += wire
        self.stats.bytes_recv += wire
        self.stats.messages += 2 * (self.world_size - 1)
        if self.world_size == 1 or not tensors:
            return None
        # One contiguous 1-D tensor (a caller's own bucket) is reduced where it lies: no copy out and back.
        single = len(tensors) == 1 and tensors[0].dim() == 1 and tensors[0].is_contiguous()
        flat = tensors[0].detach() if single else _flatten(tensors)
        finish_reduce = self._timed(lambda: self._all_reduce(flat, op))

        def finish(timeout: float | None) -> None:
            finish_reduce(timeout)
            if op == "mean":
                flat.div_(self.world_size)
            if not single:
                _unflatten_into(flat, tensors)

        return finish

    @abstractmethod
    def _broadcast(self, flat: torch.Tensor, src: int) -> Callable[[float | None], None]:
        """Start an in-place broadcast of ``flat`` from ``src``; return a blocking finisher."""

    def broadcast(self, tensors: Sequence[torch.Tensor], src: int, *, async_op: bool = False) -> Handle | None:
        """Overwrite ``tensors`` on every worker with ``src``'s values (one collective per dtype)."""
        return self._per_dtype(tensors, lambda group: self._start_broadcast(group, src), async_op)

    def _start_broadcast(self, tensors: list[torch.Tensor], src: int) -> Callable[[float | None], None] | None:
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
            return None
        flat = _flatten(tensors)
        finish_bcast = self._timed(lambda: self._broadcast(flat, src))

        def finish(timeout: float | None) -> None:
            finish_bcast(timeout)
            if self.rank != src:
                _unflatten_into(flat, tensors)

        return finish

    def _per_dtype(
        self, tensors: Sequence[torch.Tensor], start: Callable[[list[torch.Tensor]], Callable[[float | None], None] | None],
        async_op: bool,
    ) -> Handle | None:
        """Start one collective per dtype group (in the same order on every worker), finish them all."""
        tensors = list(tensors)
        finishes = [f for f in (start([tensors[i] for i in idx]) for idx in group_by_dtype(tensors)) if f is not None]
        if not finishes:
            return self._completed(async_op)

        def finish(timeout: float | None) -> None:
            for f in finishes:
                f(timeout)

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
        return self._start_all_gather_bytes(bytes(payload), equal_lengths=False)(None)

    def all_gather(
        self, tensors: Sequence[torch.Tensor], *, finite: bool = True, skip_bad: bool = False, async_op: bool = False
    ) -> list[list[torch.Tensor]] | Handle:
        """Every worker's ``tensors`` (same shapes and dtypes on every worker), indexed by rank.

        Sent as the raw bytes of one flat buffer (mixed dtypes: each dtype group's bytes in turn) over `all_gather_bytes` (counted there), so every
        backend has it; never unpickled. Each received buffer is checked (length, then
        `check_received`; ``finite=False`` lets non-finite values through). A bad one raises
        BadPeerData naming the peer, or with ``skip_bad`` gets an empty entry, as a rank that took
        no part does (an elastic backend's gone or dropped peer). Our own entry is a copy.
        ``async_op``: returns a Handle whose ``wait()`` gives that list (backends that cannot
        overlap an all-gather finish it before returning the handle).
        """
        tensors = list(tensors)
        if not tensors:
            raise ValueError("all_gather needs at least one tensor")
        flat = pack(tensors).contiguous()
        payload = flat.cpu().view(torch.uint8).numpy().tobytes()
        if not async_op:
            return self._gathered(self.all_gather_bytes(payload), flat, tensors, finite=finite, skip_bad=skip_bad)
        finish_bytes = self._start_all_gather_bytes(payload, equal_lengths=True)
        return Handle(self.stats, lambda t: self._gathered(finish_bytes(t), flat, tensors, finite=finite, skip_bad=skip_bad))

    def _start_all_gather_bytes(self, payload: bytes, *, equal_lengths: bool) -> Callable[[float | None], list[bytes]]:
        """Count and start a gather of every worker's payload; the finisher returns them. With
        ``equal_lengths`` (`all_gather` of equal shapes) a backend may overlap it with compute."""
        self.stats.collectives += 1
        self.stats.payload_bytes += len(payload)
        others = self.world_size - 1
        self.stats.bytes_sent += len(payload) * others
        self.stats.messages += others
        if self.world_size == 1:
            return lambda _t: [payload]
        start = self._all_gather_bytes_async if equal_lengths else self._gather_now
        finish = self._timed(lambda: start(payload))

        def done(timeout: float | None) -> list[bytes]:
            out = finish(timeout)
            self.stats.bytes_recv += sum(len(p) for i, p in enumerate(out) if i != self.rank)
            return out

        return done

    def _all_gather_bytes_async(self, payload: bytes) -> Callable[[float | None], list[bytes]]:
        """Start gathering equal-length payloads; default: gather now (the caller counts the wait)."""
        return self._gather_now(payload)

    def _gather_now(self, payload: bytes) -> Callable[[float | None], list[bytes]]:
        out = self._all_gather_bytes(payload)
        return lambda _t: out

    def _gathered(self, blobs: list[bytes], flat: torch.Tensor, tensors: list[torch.Tensor], *, finite: bool,
                  skip_bad: bool) -> list[list[torch.Tensor]]:
        """`all_gather`'s received byte strings, checked and unpacked (see there)."""
        nbytes = flat.numel() * flat.element_size()
        out: list[list[torch.Tensor]] = []
        for peer, blob in enumerate(blobs):
            if peer == self.rank:
                out.append(unpack(flat, tensors))
                continue
            if not blob and nbytes:
                out.append([])
                continue
            try:
                if len(blob) != nbytes:
                    raise BadPeerData(peer, f"{len(blob)} bytes, expected {nbytes}")
                raw = torch.frombuffer(bytearray(blob), dtype=torch.uint8) if nbytes else torch.empty(0, dtype=torch.uint8)
                got = raw.view(flat.dtype).to(flat.device)
                check_received(peer, got, flat, finite=finite)
                parts = _unpack_checked(peer, got, tensors, finite=finite)
            except BadPeerData:
                if not skip_bad:
                    raise
                out.append([])
                continue
            out.append(parts)
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
        """Send mine to ``peer`` and receive the peer's tensors of the same shapes and dtypes
        (one message; mixed dtypes travel as each dtype group's raw bytes, exact).

        Both sides must call with the same ``tag`` (use a round number so a late message of an
        abandoned round never lands in a later one). Returns new tensors; the inputs are untouched.
        Raises PeerTimeout after ``timeout`` seconds and BadPeerData for a malformed or
        non-finite reply.
        """
        if peer == self.rank:
            raise ValueError("exchange with oneself")
        tensors = list(tensors)
        nbytes = flat_nbytes(tensors)
        self.stats.payload_bytes += nbytes
        self.stats.bytes_sent += nbytes
        self.stats.messages += 1
        flat = pack(tensors)
        finish_exchange = self._timed(lambda: self._exchange(flat, peer, tag))

        def finish(timeout_: float | None) -> list[torch.Tensor]:
            got = finish_exchange(timeout if timeout_ is None else timeout_)
            check_received(peer, got, flat)
            parts = _unpack_checked(peer, got, tensors, finite=True)
            self.stats.bytes_recv += nbytes
            return parts

        if async_op:
            return Handle(self.stats, finish)
        return self._timed(lambda: finish(timeout))

    # -- failures ---------------------------------------------------------------
    def report_failure(self, message: str) -> None:
        """Tell every other worker that this one is stopping, and why (one line).

        Backends whose workers would otherwise wait for a failed peer until a transport timeout
        publish it so that the others' ``watch_failures`` callbacks fire within seconds. After
        this call ``close()`` does not wait for the others. Default: nothing to publish.
        """

    def watch_failures(self, on_failure: Callable[[str], None]) -> None:
        """Call ``on_failure(reason)`` (from a background thread) when another worker reports one.

        Default: nothing to watch (threads of one process learn of a failure from the group).
        """

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
