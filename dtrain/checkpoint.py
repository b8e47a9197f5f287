"""Per-worker checkpoints, written atomically, loaded with ``weights_only=True``.

Layout: ``OUT/checkpoints/rank{r}/step_{k:08d}.pt``; the newest ``keep`` are kept so that,
after a crash between two workers' writes, a step that every worker holds still exists.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

_STEP = re.compile(r"^step_(\d{8})\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing or unreadable; the message says what to do."""


def rank_dir(out_dir: str | Path, rank: int) -> Path:
    return Path(out_dir) / "checkpoints" / f"rank{rank}"


def steps_available(out_dir: str | Path, rank: int) -> list[int]:
    d = rank_dir(out_dir, rank)
    if not d.is_dir():
        return []
    return sorted(int(m.group(1)) for f in d.iterdir() if (m := _STEP.match(f.name)))


def save(out_dir: str | Path, rank: int, step: int, state: dict[str, Any], *, keep: int = 2) -> Path:
    d = rank_dir(out_dir, rank)
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"step_{step:08d}.pt"
    fd, tmp = tempfile.mkstemp(dir=d, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    for old in steps_available(out_dir, rank)[:-keep]:
        (d / f"step_{old:08d}.pt").unlink(missing_ok=True)
    return path


def load(out_dir: str | Path, rank: int, step: int) -> dict[str, Any]:
    path = rank_dir(out_dir, rank) / f"step_{step:08d}.pt"
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} is missing; resume with a complete out_dir or set resume=false")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for a damaged file
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint {path} is corrupt ({first[:120]}); delete it to resume from the one before, or set resume=false") from None
