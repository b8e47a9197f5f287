"""Who owns an out_dir: a lock per worker, a run identity, and the fresh-or-resume decision.

A run's output directory is claimed before anything is written to it:

- every worker holds an exclusive ``flock`` on ``OUT/.lock-rank{r}`` for the whole run, so a
  second job pointed at the same directory stops at start, naming the job that holds it (the
  kernel drops the lock when a process dies, so a killed run leaves no stale lock);
- ``OUT/run.json`` records the run's identity: the config keys that decide its trajectory,
  the world size and the algorithm. Checkpoints carry the same identity, so resuming a
  foreign checkpoint is refused with the first keys that differ;
- a fresh run never writes into a directory that holds another run's outputs: it stops, or
  with ``if_exists=move_aside`` first moves that run to ``OUT.prev-<its start time>``.
  Nothing is ever deleted.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

# Keys that do not change what a run computes step by step: where it writes, how it reports, how
# long it waits, and how long it runs (``steps`` may change on resume, to extend a run).
_NOT_TRAJECTORY = ("out_dir", "resume", "if_exists", "progress", "plot", "threads", "log_every", "ckpt_every", "comm",
                   "steps", "eval_every", "max_nonfinite", "stop_at_target",
                   "grad_accum", "compile", "tensorboard",  # the same trajectory at any grad_accum (the batch is split), compiled or not
                   "device")  # a run checkpointed on a GPU may continue on a CPU and back (dtrain.device)
RUN_FILES = ("run.json", "config.yaml", "metrics.jsonl", "summary.json", "loss.png", "checkpoints", "tensorboard")


class RunDirError(RuntimeError):
    """The out_dir cannot be used as asked; the message says what to change."""


def identity(cfg: DictConfig, world_size: int) -> dict[str, Any]:
    """What makes two runs the same run: trajectory keys of the config, world size, algorithm."""
    keys = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k not in _NOT_TRAJECTORY}
    return {"config": keys, "world_size": world_size, "algorithm": cfg.algo.name}


def identity_mismatch(saved: dict[str, Any] | None, mine: dict[str, Any], *, elastic: bool = False) -> str | None:
    """None if ``saved`` is ``mine``; else a short phrase naming the first differences."""
    if not isinstance(saved, dict) or "config" not in saved:
        return "it carries no run identity (written by another program or an older dtrain)"
    diffs = _diff(saved["config"], mine["config"])
    if not elastic and saved.get("world_size") != mine["world_size"]:
        diffs.insert(0, f"world_size={saved.get('world_size')} there, {mine['world_size']} here")
    if not diffs:
        return None
    more = f" (and {len(diffs) - 3} more)" if len(diffs) > 3 else ""
    return "; ".join(diffs[:3]) + more


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        # A key only one side has comes from another dtrain version (a new option at its
        # default), not from another run: resuming across an upgrade stays possible.
        out: list[str] = []
        for k in sorted(set(a) & set(b), key=str):
            out.extend(_diff(a[k], b[k], f"{prefix}{k}."))
        return out
    return [] if a == b else [f"{prefix.rstrip('.')}={a} there, {b} here"]


class RunDirLock:
    """An exclusive, non-blocking lock on ``OUT/.lock-rank{r}`` held until ``release()`` or exit."""

    def __init__(self, out_dir: str | Path, rank: int) -> None:
        self.path = Path(out_dir) / f".lock-rank{rank}"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(self._fd)
            os.close(self._fd)
            self._fd = None
            raise RunDirError(
                f"out_dir {out_dir} is in use by another job ({holder}); wait for it to finish or choose another out_dir"
            ) from None
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, json.dumps(me).encode(), 0)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        return f"pid {info['pid']} on {info['host']}, since {info['since']}"
    except (ValueError, KeyError, OSError):
        return "holder unknown"


def holds_run(out_dir: str | Path) -> bool:
    """True if ``out_dir`` holds outputs of a run (lock files alone do not count)."""
    d = Path(out_dir)
    files = [name for name in RUN_FILES if name != "checkpoints" and (d / name).exists()]
    return bool(files) or any(p.is_file() for p in (d / "checkpoints").rglob("*"))


def read_run_record(out_dir: str | Path) -> dict[str, Any] | None:
    try:
        record = json.loads((Path(out_dir) / "run.json").read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def write_run_record(out_dir: str | Path, ident: dict[str, Any]) -> None:
    record = {"identity": ident, "started": time.strftime("%Y%m%d-%H%M%S")}
    path = Path(out_dir) / "run.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True))
    os.replace(tmp, path)


def describe(out_dir: str | Path) -> str:
    """A few words on the run a directory holds, for messages."""
    d = Path(out_dir)
    parts = []
    try:
        summary = json.loads((d / "summary.json").read_text())
        parts.append(f"a finished {summary.get('algorithm', '?')} run of {summary.get('steps', '?')} steps")
    except (OSError, ValueError):
        parts.append("an unfinished run")
    ckpts = [*(d / "checkpoints").glob("rank*/step_*.pt"), *(d / "checkpoints").glob("worker*/step_*[0-9]")
             ] if (d / "checkpoints").is_dir() else []
    if ckpts:
        parts.append(f"{len(ckpts)} checkpoint files")
    return ", ".join(parts)


def aside_path(out_dir: str | Path) -> Path:
    """Where ``move_aside`` puts the run that ``out_dir`` holds (the same on every worker)."""
    d = Path(out_dir)
    started = (read_run_record(d) or {}).get("started")
    if not started:
        stamp = max((p.stat().st_mtime for p in d.iterdir() if p.name in RUN_FILES), default=0.0)
        started = time.strftime("%Y%m%d-%H%M%S", time.localtime(stamp))
    return d.with_name(f"{d.name}.prev-{started}")


def move_aside(out_dir: str | Path, dest: Path, *, rank: int) -> None:
    """Move this worker's part of the earlier run to ``dest``: its checkpoints; rank 0 the rest."""
    d = Path(out_dir)
    mine = d / "checkpoints" / f"rank{rank}"
    if mine.exists():
        (dest / "checkpoints").mkdir(parents=True, exist_ok=True)
        os.replace(mine, dest / "checkpoints" / f"rank{rank}")
    if rank == 0:
        dest.mkdir(parents=True, exist_ok=True)
        for name in RUN_FILES:
            if name != "checkpoints" and (d / name).exists():
                os.replace(d / name, dest / name)


def check_model_shapes(saved: dict[str, Any], model_state: dict[str, Any], *, where: str) -> None:
    """Refuse a checkpoint whose tensors do not fit the model built from this config, naming one."""
    for key, want in model_state.items():
        got = saved.get(key)
        if got is None:
            raise RunDirError(f"{where} has no {key}: it was written for another model; start fresh in another out_dir")
        if tuple(got.shape) != tuple(want.shape):
            raise RunDirError(f"{where} holds {key} of shape {tuple(got.shape)}, the model built from this config has "
                              f"{tuple(want.shape)}; resume with the config that wrote it or start fresh in another out_dir")
    extra = sorted(set(saved) - set(model_state))
    if extra:
        raise RunDirError(f"{where} holds {extra[0]}, which the model built from this config lacks; start fresh in another out_dir")
