"""What a run writes: metrics.jsonl, summary.json and the rank-0 progress bar (loss.png: dtrain.plots)."""

from __future__ import annotations

import json
import math
import os
import resource
import sys
from pathlib import Path
from typing import Any


def stderr_line(text: str) -> None:
    """One line to stderr in a single write, so lines of processes sharing a terminal never merge."""
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


class RunNotes:
    """Warnings of one run: each printed once as a ``dtrain: warning:`` line and kept for summary.json.

    Run-wide warnings print on rank 0 only; ``every_rank=True`` for what only this worker knows.
    """

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.items: list[str] = []

    def warn(self, message: str, *, every_rank: bool = False) -> None:
        if message in self.items:
            return
        self.items.append(message)
        if every_rank or self.rank == 0:
            stderr_line(f"dtrain: warning: {message}")


COMM_FIELDS = ("bytes_sent", "bytes_recv", "payload_bytes", "messages", "collectives", "blocked_s")


def peak_mem_bytes() -> int:
    """Peak resident set size of this process (and, on GPU, peak allocated CUDA memory if larger)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak = rss if sys.platform == "darwin" else rss * 1024
    try:
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            peak = max(peak, torch.cuda.max_memory_allocated())
    except Exception:  # noqa: BLE001 - memory reporting must never fail a run
        pass
    return int(peak)


class MetricsLog:
    """Appends one JSON object per line; on resume, drops lines past the resumed step."""

    def __init__(self, path: Path, *, resume_step: int | None) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            path.write_text("")
        elif path.exists():
            kept = [ln for ln in path.read_text().splitlines() if ln.strip() and _step_of(ln) <= resume_step]
            path.write_text("".join(ln + "\n" for ln in kept))
        self._f = open(path, "a", encoding="utf-8")  # noqa: SIM115 - kept open for the run

    def write(self, record: dict[str, Any]) -> None:
        self._f.write(json.dumps(record, allow_nan=False, default=_clean) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def _step_of(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except (ValueError, AttributeError):
        return sys.maxsize


def _clean(x: Any) -> Any:
    return None if isinstance(x, float) and not math.isfinite(x) else str(x)


def finite_or_none(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def aggregate_comm(workers: list[dict[str, Any]], *, key: str = "comm") -> dict[str, Any]:
    """Per-worker counters plus max and mean over workers, as summary.json's ``comm`` (``key``:
    which counters of each record; ``comm_inner`` for the traffic inside hierarchical workers)."""
    per = [{k: w[key][k] for k in COMM_FIELDS} | {"rank": w["rank"]} for w in workers if key in w]
    out: dict[str, Any] = {"per_worker": per}
    for agg, fn in (("max", max), ("mean", lambda v: sum(v) / len(v))):
        out[agg] = {k: fn([p[k] for p in per]) for k in COMM_FIELDS} if per else {}
    return out


def write_json(path: Path, obj: dict[str, Any]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, allow_nan=False, default=_clean))
    os.replace(tmp, path)


class Progress:
    """A tqdm bar on rank 0 showing loss, tokens/s and bytes sent; silent elsewhere."""

    def __init__(self, *, enabled: bool, total: int, initial: int) -> None:
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, dynamic_ncols=True, file=sys.stderr, desc="train")

    def update(self, n: int, *, loss: float, tokens_per_s: float, bytes_sent: int) -> None:
        if self.bar is not None:
            self.bar.update(n)
            self.bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_per_s:,.0f}", sent=si_bytes(bytes_sent), refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def si_bytes(n: float) -> str:
    """Bytes in decimal units (1 MB = 10^6 B), as papers and link speeds count them; the progress bar
    and the done lines (dtrain.outcome) both print these."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.3g} {unit}"
        n /= 1000
    raise AssertionError("unreachable")
