"""torch.distributed backend: gloo on CPU, nccl on GPU, initialised from torchrun's environment."""

from __future__ import annotations

import datetime
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from dtrain.comm.base import Comm, CommError, PeerTimeout

@dataclass
class Config:
    name: str = "torch"
    backend: str = "auto"  # auto (follows the run's device: nccl for cuda, gloo for cpu; see dtrain.device) | gloo | nccl
    timeout_s: float = 600.0
    inner_size: int = 1  # processes per worker (hierarchical workers, with parallel.inner=fsdp|ddp); divides the world


def validate(cfg: Config) -> None:
    if cfg.inner_size < 1:
        raise ValueError(f"comm.inner_size must be >= 1, got {cfg.inner_size}")
    if cfg.backend not in ("auto", "gloo", "nccl"):
        raise ValueError(f"comm.backend must be auto, gloo or nccl, got {cfg.backend!r}")
    if cfg.timeout_s <= 0:
        raise ValueError(f"comm.timeout_s must be > 0, got {cfg.timeout_s}")


def connect(cfg: Config, *, device: torch.device | None = None) -> TorchComm:
    """``device``: where the run computes (dtrain.device); ``backend=auto`` then follows it (nccl for
    cuda, gloo for cpu) instead of following whether CUDA exists."""
    from dtrain.device import comm_backend

    if device is not None:
        return TorchComm(backend=comm_backend(cfg.backend, device), timeout_s=cfg.timeout_s)
    return TorchComm(backend=None if cfg.backend == "auto" else cfg.backend, timeout_s=cfg.timeout_s)


_OPS = {"mean": dist.ReduceOp.SUM, "sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}


class TorchComm(Comm):
    """A `Comm` over a torch.distributed process group.

    If no default group exists it creates one from the environment that ``torchrun`` sets
    (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) and destroys it on ``close()``; a group the
    caller created is used as is and left alone.
    """

    def __init__(self, *, backend: str | None = None, timeout_s: float = 600.0, group: dist.ProcessGroup | None = None) -> None:
        super().__init__()
        self._owns_group = False
        if not dist.is_initialized():
            missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
            if missing:
                raise CommError(f"comm.name=torch needs torchrun's environment ({', '.join(missing)} unset): run under "
                                "`torchrun --nproc-per-node 4 -m dtrain.cli train ...`, or add `comm.name=local comm.workers=4` "
                                "for 4 workers as threads in this process")
            backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
            if backend == "nccl":
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s), **_attempt_store(timeout_s))
            self._owns_group = True
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.backend = dist.get_backend(group)
        self.device = torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu")
        self._failed = False
        self._stop_watching: threading.Event | None = None  # set: the failure watcher leaves
        # Threads that sit in torch's C++ calls with the GIL released; `close` joins them, because a
        # daemon thread still in such a call at interpreter exit aborts the process ("terminate called
        # without an active exception") when it wakes and finds the interpreter gone.
        self._threads: list[threading.Thread] = []
        self._failures = _FailureBoard.from_env(timeout_s) if self._owns_group else None

    def _to_device(self, flat: torch.Tensor) -> torch.Tensor:
        return flat if flat.device == self.device else flat.to(self.device)

    def _global(self, rank: int) -> int:
        return rank if self.group is None else dist.get_global_rank(self.group, rank)

    def _all_reduce(self, flat: torch.Tensor, op: str) -> Callable[[float | None], None]:
        buf = self._to_device(flat)
        work = dist.all_reduce(buf, op=_OPS[op], group=self.group, async_op=True)

        def finish(timeout: float | None) -> None:
            _wait(work, timeout, "all_reduce")
            if buf is not flat:
                flat.copy_(buf)

        return finish

    def _broadcast(self, flat: torch.Tensor, src: int) -> Callable[[float | None], None]:
        buf = self._to_device(flat)
        work = dist.broadcast(buf, src=self._global(src), group=self.group, async_op=True)

        def finish(timeout: float | None) -> None:
            _wait(work, timeout, "broadcast")
            if buf is not flat:
                flat.copy_(buf)

        return finish

    def _barrier(self) -> None:
        dist.barrier(group=self.group)

    def _all_gather_bytes(self, payload: bytes) -> list[bytes]:
        length = torch.tensor([len(payload)], dtype=torch.int64, device=self.device)
        lengths = [torch.empty_like(length) for _ in range(self.world_size)]
        dist.all_gather(lengths, length, group=self.group)
        sizes = [int(n.item()) for n in lengths]
        width = max(max(sizes), 1)
        mine = torch.zeros(width, dtype=torch.uint8, device=self.device)
        if payload:
            mine[: len(payload)] = torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(self.device)
        bufs = [torch.empty_like(mine) for _ in range(self.world_size)]
        dist.all_gather(bufs, mine, group=self.group)
        return [bytes(b[:n].cpu().numpy().tobytes()) for b, n in zip(bufs, sizes)]

    def _all_gather_bytes_async(self, payload: bytes) -> Callable[[float | None], list[bytes]]:
        # Equal lengths on every rank (see Comm._start_all_gather_bytes): no length round first.
        if not payload:
            return lambda _t: [b""] * self.world_size
        mine = torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(self.device)
        bufs = [torch.empty_like(mine) for _ in range(self.world_size)]
        work = dist.all_gather(bufs, mine, group=self.group, async_op=True)

        def finish(timeout: float | None) -> list[bytes]:
            _wait(work, timeout, "all_gather")
            return [bytes(b.cpu().numpy().tobytes()) for b in bufs]

        return finish

    def _exchange(self, flat: torch.Tensor, peer: int, tag: int) -> Callable[[float | None], torch.Tensor]:
        if not 0 <= peer < self.world_size:
            raise ValueError(f"peer must be in [0, {self.world_size}), got {peer}")
        send = self._to_device(flat)
        recv = torch.empty_like(send)
        gpeer = self._global(peer)
        try:
            works = dist.batch_isend_irecv(
                [dist.P2POp(dist.isend, send, gpeer, self.group, tag), dist.P2POp(dist.irecv, recv, gpeer, self.group, tag)]
            )
        except RuntimeError as e:
            raise CommError(f"exchange with peer {peer} failed: {str(e).splitlines()[0]}") from e
        # gloo closes the connection to a peer when a wait on it times out, and its p2p works never
        # report completion until waited on; so a helper thread waits without a timeout (keeping the
        # buffers alive for a late peer) and the caller's timeout applies to that thread's event.
        done, errors = threading.Event(), []

        def drain() -> None:
            try:
                for w in works:
                    w.wait()
            except RuntimeError as e:
                errors.append(e)
            finally:
                done.set()

        self._start_thread(drain, f"dtrain-exchange-{peer}-{tag}")

        def finish(timeout: float | None) -> torch.Tensor:
            if not done.wait(timeout):
                raise PeerTimeout(f"exchange with peer {peer}: no answer within {timeout}s (tag {tag})")
            if errors:
                raise CommError(f"exchange with peer {peer} failed: {str(errors[0]).splitlines()[0]}") from errors[0]
            return recv if recv.device == flat.device else recv.to(flat.device)

        return finish

    def report_failure(self, message: str) -> None:
        self._failed = True
        if self._failures is not None:
            self._failures.post(f"rank {self.rank} stopped: {message}")

    def watch_failures(self, on_failure: Callable[[str], None]) -> None:
        if self._failures is None or self._stop_watching is not None:
            return
        board = self._failures
        stop = self._stop_watching = threading.Event()

        def watch() -> None:
            while not stop.is_set():
                reason = board.read()
                if reason is not None and not self._failed and not stop.is_set():
                    on_failure(reason)
                    return
                stop.wait(_FAILURE_POLL_S)

        self._start_thread(watch, "dtrain-failure-watch")

    def _start_thread(self, target: Callable[[], None], name: str) -> None:
        self._threads = [t for t in self._threads if t.is_alive()]
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _join_threads(self, timeout_s: float) -> None:
        """Wait (bounded) for the helper threads to leave torch's C++ calls; see ``__init__``."""
        deadline = time.monotonic() + timeout_s
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        self._threads = [t for t in self._threads if t.is_alive()]

    def close(self) -> None:
        if self._stop_watching is not None:
            self._stop_watching.set()
        if self._failed and self._failures is not None:
            # Linger for two polls so every peer reads our reason before torchrun, seeing this
            # process exit, tears the others down without one.
            time.sleep(2 * _FAILURE_POLL_S)
        if self._owns_group and dist.is_initialized():
            # Tear down together: a rank destroying gloo while a peer still talks to it can abort
            # at exit ("terminate called without an active exception"). Bounded, so a dead peer
            # cannot hold the others here; skipped when this rank failed (the others are leaving).
            try:
                if self.backend == "gloo" and self.world_size > 1 and not self._failed:
                    dist.monitored_barrier(timeout=datetime.timedelta(seconds=30))
            except RuntimeError:
                pass
            dist.destroy_process_group()
            self._owns_group = False
        # After the teardown: an exchange still waiting on a peer is released by it (gloo fails the work).
        self._join_threads(timeout_s=10.0)


def _attempt_store(timeout_s: float) -> dict:
    """Under torchrun restarts, a rendezvous store keyed by attempt, so a restarted worker never
    reads the previous attempt's addresses (seen as gloo 'connectFullMesh ... Connection refused')."""
    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) == 0:
        return {}  # first attempt: torch's own env:// rendezvous
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          is_master=not agent_store and rank == 0, timeout=datetime.timedelta(seconds=timeout_s))
    prefix = f"dtrain/attempt_{os.environ['TORCHELASTIC_RESTART_COUNT']}/"
    return {"store": dist.PrefixStore(prefix, store), "rank": rank, "world_size": world}


_FAILURE_POLL_S = 0.5


class _FailureBoard:
    """One key in torchrun's rendezvous store where a failing rank leaves its reason.

    Keyed by restart attempt, so a reason from a previous attempt never stops the next one.
    The store is a small TCP key-value server every rank already reaches, so this works across
    nodes without a second network channel.
    """

    def __init__(self, store: dist.Store) -> None:
        self._store = store
        self._lock = threading.Lock()  # the store client is not shared across threads safely

    @classmethod
    def from_env(cls, timeout_s: float) -> _FailureBoard | None:
        if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
            return None
        try:
            store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                                  timeout=datetime.timedelta(seconds=min(timeout_s, 30.0)), wait_for_workers=False)
        except (RuntimeError, ValueError):
            return None  # no reachable store: peers learn of a failure from the transport instead
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        return cls(dist.PrefixStore(f"dtrain/failure/attempt_{attempt}/", store))

    def post(self, reason: str) -> None:
        try:
            with self._lock:
                self._store.compare_set("reason", "", reason.encode())  # first reason wins
        except RuntimeError:
            pass

    def read(self) -> str | None:
        try:
            with self._lock:
                if not self._store.check(["reason"]):
                    return None
                return self._store.get("reason").decode(errors="replace")
        except RuntimeError:
            return None


def _wait(work: dist.Work, timeout: float | None, what: str, *, peer_timeout: bool = False) -> None:
    try:
        if timeout is None:
            work.wait()
        else:
            work.wait(datetime.timedelta(seconds=timeout))
    except RuntimeError as e:
        text = str(e).lower()
        if peer_timeout and ("timed out" in text or "timeout" in text):
            raise PeerTimeout(f"{what}: no answer within {timeout}s") from e
        raise CommError(f"{what} failed: {str(e).splitlines()[0]}") from e


def default_comm() -> Comm:
    """The process group torchrun started, if one is initialised; otherwise a single local worker.

    For library objects (schedulers, optimizers) that take an optional comm and must work both
    under torchrun and in a plain single-process loop.
    """
    if dist.is_available() and dist.is_initialized():
        return TorchComm()
    from dtrain.comm.local import LocalGroup

    return LocalGroup(1).comm(0)
