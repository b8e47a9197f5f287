"""``tensorboard: true``: the scalars of metrics.jsonl, also as TensorBoard events in OUT/tensorboard/.

Each numeric field of a metrics row (loss, lr, bytes_sent, eval, ...) becomes a scalar of the same
name at the row's step; an evaluation row's value is also written as ``eval/<metric>`` so that
workloads with different metrics do not share a curve. Needs the ``tensorboard`` package
(``pip install "dtrain[tensorboard]"``); `check` says so before any worker starts.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from typing import Any

DIR = "tensorboard"  # under out_dir
_NOT_SCALARS = ("step", "metric")


def check(enabled: bool) -> None:
    """Raise ValueError (one line) if ``tensorboard: true`` cannot be honoured here."""
    if enabled and importlib.util.find_spec("tensorboard") is None:
        raise ValueError('tensorboard=true needs the tensorboard package: pip install "dtrain[tensorboard]" '
                         "(or remove tensorboard=true)")


class TensorBoardLog:
    """Writes the rows `dtrain.report.MetricsLog` writes, as scalars; on resume, steps after the
    resumed one are purged, as MetricsLog drops those lines."""

    def __init__(self, out_dir: Path, *, resume_step: int | None) -> None:
        from torch.utils.tensorboard import SummaryWriter  # imported only when asked for: it loads tensorboard

        self.writer = SummaryWriter(log_dir=str(out_dir / DIR), purge_step=None if resume_step is None else resume_step + 1)

    def write(self, row: dict[str, Any]) -> None:
        step = int(row["step"])
        for key, value in row.items():
            if key in _NOT_SCALARS or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if not math.isfinite(value):
                continue  # metrics.jsonl writes null there
            self.writer.add_scalar(key, value, step)
            if key == "eval" and row.get("metric"):
                self.writer.add_scalar(f"eval/{row['metric']}", value, step)

    def close(self) -> None:
        self.writer.close()
