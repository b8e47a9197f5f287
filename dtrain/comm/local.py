"""N workers as threads of one process: for tests and for simulating many workers.

`LocalGroup(n)` holds the shared state; `group.comm(rank)` is that worker's `Comm`.
`run_local(n, fn)` starts n threads running ``fn(comm)`` and returns their results.
Reductions are computed in rank order by every worker, so all workers get bit-identical
results, as they do over gloo.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from dtrain.comm.base import Comm, CommError, PeerTimeout

T = TypeVar("T")


@dataclass
class Config:
    name: str = "local"
    workers: int = 2  # threads in this process, one per simulated worker
    timeout_s: float = 60.0


def validate(cfg: Config) -> None:
    if cfg.workers < 1:
        raise ValueError(f"comm.workers must be >= 1, got {cfg.workers}")
    if cfg.timeout_s <= 0:
        raise ValueError(f"comm.timeout_s must be > 0, got {cfg.timeout_s}")


class LocalGroup:
    def __init__(self, world_size: int, *, timeout: float = 60.0) -> None:
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        self.world_size = world_size
        self.timeout = timeout
        self._barrier = threading.Barrier(world_size, timeout=timeout)
        self._slots: list[Any] = [None] * world_size
        self._mail: dict[tuple[int, int, int], queue.Queue] = {}
        self._mail_lock = threading.Lock()
        self._left: set[int] = set()

    def comm(self, rank: int) -> LocalComm:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank must be in [0, {self.world_size}), got {rank}")
        return LocalComm(self, rank)

    def mailbox(self, src: int, dst: int, tag: int) -> queue.Queue:
        with self._mail_lock:
            return self._mail.setdefault((src, dst, tag), queue.Queue())

    def gather(self, rank: int, value: Any) -> list[Any]:
        """Every worker deposits a value; all get the list. Two barriers keep rounds apart."""
        try:
            self._slots[rank] = value
            self._barrier.wait()
            values = list(self._slots)
            self._barrier.wait()
        except threading.BrokenBarrierError as e:
            raise CommError("a local worker left or timed out during a collective") from e
        return values

    def abort(self) -> None:
        self._barrier.abort()


class LocalComm(Comm):
    def __init__(self, group: LocalGroup, rank: int) -> None:
        super().__init__()
        self.group = group
        self.rank = rank
        self.world_size = group.world_size

    def _all_reduce(self, flat: torch.Tensor, op: str) -> Callable[[float | None], None]:
        values = self.group.gather(self.rank, flat.clone())
        out = values[0].clone()
        for v in values[1:]:
            if op in ("mean", "sum"):
                out.add_(v)
            elif op == "min":
                torch.minimum(out, v, out=out)
            else:
                torch.maximum(out, v, out=out)
        flat.copy_(out)
        return lambda _timeout: None

    def _broadcast(self, flat: torch.Tensor, src: int) -> Callable[[float | None], None]:
        values = self.group.gather(self.rank, flat.clone() if self.rank == src else None)
        flat.copy_(values[src])
        return lambda _timeout: None

    def _barrier(self) -> None:
        self.group.gather(self.rank, None)

    def _all_gather_bytes(self, payload: bytes) -> list[bytes]:
        return self.group.gather(self.rank, payload)

    def _exchange(self, flat: torch.Tensor, peer: int, tag: int) -> Callable[[float | None], torch.Tensor]:
        if not 0 <= peer < self.world_size:
            raise ValueError(f"peer must be in [0, {self.world_size}), got {peer}")
        self.group.mailbox(self.rank, peer, tag).put(flat.clone())
        inbox = self.group.mailbox(peer, self.rank, tag)

        def finish(timeout: float | None) -> torch.Tensor:
            try:
                return inbox.get(timeout=self.group.timeout if timeout is None else timeout)
            except queue.Empty:
                raise PeerTimeout(f"peer {peer} did not answer within {timeout}s (tag {tag})") from None

        return finish


def run_local(world_size: int, fn: Callable[[LocalComm], T], *, timeout: float = 60.0) -> list[T]:
    """Run ``fn(comm)`` on ``world_size`` threads; re-raise the first worker error."""
    group = LocalGroup(world_size, timeout=timeout)
    results: list[Any] = [None] * world_size
    errors: list[BaseException | None] = [None] * world_size

    def work(rank: int) -> None:
        try:
            results[rank] = fn(group.comm(rank))
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            errors[rank] = e
            group.abort()

    threads = [threading.Thread(target=work, args=(r,), name=f"local-worker-{r}") for r in range(world_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    first = next((e for e in errors if e is not None and not isinstance(e, CommError)), None)
    first = first or next((e for e in errors if e is not None), None)
    if first is not None:
        raise first
    return results
