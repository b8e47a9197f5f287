"""Failure injection: a `Comm` wrapper that kills, corrupts, drops or delays on cue.

`FaultyComm(inner, ...)` delegates every call to a real `Comm` (``stats`` are the inner
comm's, so counters stay honest) and, counting its own calls (collectives and exchanges):

- ``kill_at_call=k``: SIGKILL this process at its k-th call (1-based), before sending anything;
  ``exit_at_call=k`` raises SystemExit instead (a clean crash that still runs ``finally`` blocks);
- ``corrupt="nan" | "shape" | "scale"`` from call ``corrupt_from`` on (to ``corrupt_until``, inclusive,
  if given): what this worker sends has NaNs, one extra element, or every float value multiplied by
  ``scale`` (finite garbage a plain mean cannot refuse); its own tensors are left as they were, and
  in a collective it sees the result its corrupt contribution produced, as its peers do;
  ``corrupt_min_numel=n`` corrupts only messages of at least n elements (the model-sized ones,
  leaving a loop's one-number control collectives alone);
- ``drop_exchange_every=n``: every n-th exchange is not sent (raises PeerTimeout at once, as a
  lost message would after its timeout);
- ``delay_s``: sleep before every call (a slow peer).

``python -m dtrain.testing.faults [--kill-at-call K] [--only-first-attempt] ... -- CONFIG key=value ...``
runs the training loop (`dtrain.train.train_worker`) on the comm that the config names, wrapped
in a `FaultyComm`, so a test can kill or corrupt one real process of a torchrun or hivemind job.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from dtrain.comm.base import Comm, Handle, PeerTimeout

CORRUPTIONS = (None, "nan", "shape", "scale")


class FaultyComm(Comm):
    def __init__(
        self, inner: Comm, *, kill_at_call: int | None = None, exit_at_call: int | None = None,
        corrupt: str | None = None, corrupt_from: int = 1, corrupt_until: int | None = None, scale: float = 1000.0,
        corrupt_min_numel: int = 0, drop_exchange_every: int = 0, delay_s: float = 0.0,
    ) -> None:
        if corrupt not in CORRUPTIONS:
            raise ValueError(f"corrupt must be one of {CORRUPTIONS}, got {corrupt!r}")
        super().__init__()
        self.inner = inner
        self.stats = inner.stats
        self.kill_at_call, self.exit_at_call = kill_at_call, exit_at_call
        self.corrupt, self.corrupt_from, self.corrupt_until, self.scale = corrupt, corrupt_from, corrupt_until, scale
        self.corrupt_min_numel = corrupt_min_numel
        self.drop_exchange_every, self.delay_s = drop_exchange_every, delay_s
        self.calls = 0
        self.exchanges = 0

    @property  # type: ignore[override]
    def rank(self) -> int:
        return self.inner.rank

    @property  # type: ignore[override]
    def world_size(self) -> int:
        return self.inner.world_size

    def peers(self) -> list[int]:
        return self.inner.peers()

    def peers_in_round(self, round_: int) -> list[int]:
        return self.inner.peers_in_round(round_)

    def fetch_state(self) -> dict[str, Any] | None:
        return self.inner.fetch_state()

    def serve_state(self, provider: Callable[[], dict[str, Any]]) -> None:
        self.inner.serve_state(provider)

    def activate(self) -> None:
        self.inner.activate()

    def _tick(self, tensors: Sequence[torch.Tensor] = ()) -> bool:
        """Count a call, apply kill/exit/delay; True if this call's outgoing ``tensors`` are corrupted."""
        self.calls += 1
        if self.kill_at_call is not None and self.calls >= self.kill_at_call:
            os.kill(os.getpid(), signal.SIGKILL)
        if self.exit_at_call is not None and self.calls >= self.exit_at_call:
            raise SystemExit(f"faults: exit at call {self.calls}")
        if self.delay_s:
            time.sleep(self.delay_s)
        until = self.corrupt_until if self.corrupt_until is not None else self.calls
        big = sum(t.numel() for t in tensors) >= max(self.corrupt_min_numel, 1)
        return self.corrupt is not None and self.corrupt_from <= self.calls <= until and big

    def _bad(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        out = [t.detach().clone() for t in tensors]
        if self.corrupt == "nan" and out and out[0].is_floating_point():
            out[0].view(-1)[: max(1, out[0].numel() // 2)] = float("nan")
        elif self.corrupt == "shape":
            out.append(torch.zeros(1, dtype=out[0].dtype if out else torch.float32))
        elif self.corrupt == "scale":
            for t in out:
                if t.is_floating_point():
                    t.mul_(self.scale)
        return out

    def all_reduce(self, tensors: Sequence[torch.Tensor], op: str = "mean", *, async_op: bool = False) -> Handle | None:
        tensors = list(tensors)
        if not self._tick(tensors):
            return self.inner.all_reduce(tensors, op, async_op=async_op)
        sent = self._bad(tensors)
        self.inner.all_reduce(sent, op)
        with torch.no_grad():
            for t, s in zip(tensors, sent):
                t.copy_(s)
        return Handle(self.stats, lambda _t: None) if async_op else None

    def broadcast(self, tensors: Sequence[torch.Tensor], src: int, *, async_op: bool = False) -> Handle | None:
        tensors = list(tensors)
        if self._tick(tensors) and self.rank == src:
            tensors = self._bad(tensors)
        return self.inner.broadcast(tensors, src, async_op=async_op)

    def barrier(self) -> None:
        self._tick()
        self.inner.barrier()

    def all_gather_bytes(self, payload: bytes) -> list[bytes]:
        self._tick()
        return self.inner.all_gather_bytes(payload)

    def all_gather(self, tensors: Sequence[torch.Tensor], *, finite: bool = True, skip_bad: bool = False,
                   async_op: bool = False) -> list[list[torch.Tensor]] | Handle:
        tensors = list(tensors)
        if self._tick(tensors):
            tensors = self._bad(tensors)
        return self.inner.all_gather(tensors, finite=finite, skip_bad=skip_bad, async_op=async_op)

    def exchange(self, tensors: Sequence[torch.Tensor], peer: int, *, tag: int = 0, timeout: float | None = None,
                 async_op: bool = False) -> list[torch.Tensor] | Handle:
        tensors = list(tensors)
        corrupt = self._tick(tensors)
        self.exchanges += 1
        if self.drop_exchange_every and self.exchanges % self.drop_exchange_every == 0:
            raise PeerTimeout(f"faults: exchange {self.exchanges} with peer {peer} dropped")
        if corrupt:
            tensors = self._bad(tensors)
        return self.inner.exchange(tensors, peer, tag=tag, timeout=timeout, async_op=async_op)

    # The wrapper never reaches the transport itself.
    def _all_reduce(self, flat: torch.Tensor, op: str) -> Any:  # pragma: no cover - unreachable
        raise NotImplementedError

    _broadcast = _barrier = _all_gather_bytes = _exchange = _all_reduce  # type: ignore[assignment]

    def report_failure(self, message: str) -> None:
        self.inner.report_failure(message)

    def watch_failures(self, on_failure: Callable[[str], None]) -> None:
        self.inner.watch_failures(on_failure)

    def close(self) -> None:
        self.inner.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dtrain.testing.faults", description=__doc__.split("\n\n")[0])
    parser.add_argument("--kill-at-call", type=int)
    parser.add_argument("--exit-at-call", type=int)
    parser.add_argument("--corrupt", choices=[c for c in CORRUPTIONS if c])
    parser.add_argument("--corrupt-from", type=int, default=1)
    parser.add_argument("--corrupt-until", type=int, help="last corrupted call (default: every call from --corrupt-from on)")
    parser.add_argument("--scale", type=float, default=1000.0, help="factor for --corrupt scale")
    parser.add_argument("--corrupt-min-numel", type=int, default=0, help="corrupt only messages of at least this many elements")
    parser.add_argument("--drop-exchange-every", type=int, default=0)
    parser.add_argument("--delay-s", type=float, default=0.0)
    parser.add_argument("--only-first-attempt", action="store_true", help="no faults after a torchrun restart")
    parser.add_argument("--only-rank", type=int, help="inject only on this rank (torch backend)")
    parser.add_argument("train", nargs=argparse.REMAINDER, help="-- CONFIG key=value ...")
    args = parser.parse_args(argv)
    rest = [a for a in args.train if a != "--"]

    from dtrain.config import load, section_module
    from dtrain.cli import run_and_report
    from dtrain.train import _set_threads, run_worker

    path, overrides = (rest[0], rest[1:]) if rest and "=" not in rest[0] else (None, rest)
    cfg = load(path, overrides)
    _set_threads(cfg, workers_here=int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    inner = section_module("comm", cfg.comm.name).connect(cfg.comm)
    first_attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) == 0
    inject = (first_attempt or not args.only_first_attempt) and args.only_rank in (None, inner.rank)
    comm: Comm = inner
    if inject:
        comm = FaultyComm(inner, kill_at_call=args.kill_at_call, exit_at_call=args.exit_at_call, corrupt=args.corrupt,
                          corrupt_from=args.corrupt_from, corrupt_until=args.corrupt_until, scale=args.scale,
                          corrupt_min_numel=args.corrupt_min_numel,
                          drop_exchange_every=args.drop_exchange_every, delay_s=args.delay_s)

    def train() -> dict[str, Any] | None:
        try:
            return run_worker(cfg, comm)
        finally:
            comm.close()

    return run_and_report(cfg, train)


if __name__ == "__main__":
    sys.exit(main())
