"""Where a worker starts: a fresh run, its own checkpoint, or a live peer's state (joining).

`open_run` claims the decision for `dtrain train`: it checks the out_dir (see `dtrain.run_dir`),
finds this worker's newest checkpoint *of this run*, agrees with the other workers on one step
(a single min all-reduce), moves an earlier run aside when asked, and lets an elastic backend
hand a joining worker a live peer's state instead.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from dtrain import checkpoint, run_dir
from dtrain.comm.base import Comm, CommStats
from dtrain.report import RunNotes


def elastic(cfg: DictConfig) -> bool:
    return cfg.comm.name == "hivemind"  # membership changes: world size is not part of the identity


def one_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def open_run(cfg: DictConfig, comm: Comm, ident: dict[str, Any], notes: RunNotes, *, store: Any = checkpoint
             ) -> tuple[int | None, dict | None]:
    """(step, state) to continue from, or (None, None) for a fresh start.

    ``store`` holds the checkpoint functions (`dtrain.checkpoint`'s, or a hierarchical run's
    `dtrain.checkpoint_dcp.Store`, whose ``rank`` is the worker index).

    A torchrun restart (its restart count > 0) resumes even without ``resume=true``: starting
    again from step 0 would overwrite the checkpoints the restart exists to use.
    """
    out, rank = Path(cfg.out_dir), comm.rank
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
    resume = cfg.resume or restarted
    local, saved = newest_checkpoint(cfg, rank, ident, notes, store=store) if resume else (-1, None)
    aside = None
    if local < 0 and run_dir.holds_run(out):
        record = run_dir.read_run_record(out)
        # Ours: an earlier attempt of this very run that died before its first checkpoint.
        ours = resume and record is not None and run_dir.identity_mismatch(
            record.get("identity"), ident, elastic=elastic(cfg)) is None
        if not ours:
            if cfg.if_exists != "move_aside":
                raise run_dir.RunDirError(
                    f"out_dir {out} holds {run_dir.describe(out)}; continue it with resume=true, keep it and start over "
                    "with if_exists=move_aside, or choose another out_dir")
            aside = run_dir.aside_path(out)  # read by every worker before any of them moves a thing
    step = resume_step(cfg, comm, local, resume=resume, store=store)
    if aside is not None:
        getattr(store, "move_aside", run_dir.move_aside)(out, aside, rank=rank)
        notes.warn(f"out_dir {out} held an earlier run; it was moved to {aside}")
    if step is not None:
        if step > cfg.steps:
            raise run_dir.RunDirError(f"the checkpoints in {out} are at step {step}, past steps={cfg.steps}; set "
                                      f"steps >= {step} to continue that run, or start fresh in another out_dir")
        if step != local or saved is None:
            saved = store.load(cfg.out_dir, rank, step)
    return join_live_run(comm, step, saved)


def newest_checkpoint(cfg: DictConfig, rank: int, ident: dict[str, Any], notes: RunNotes, *, store: Any = checkpoint
                      ) -> tuple[int, dict | None]:
    """This worker's newest readable checkpoint of *this* run; a corrupt one is skipped with a warning."""
    for step in reversed(store.steps_available(cfg.out_dir, rank)):
        try:
            saved = store.load(cfg.out_dir, rank, step)
        except checkpoint.CheckpointError as e:
            notes.warn(f"rank {rank}: {one_line(e).split(';')[0]}; resuming from an older checkpoint", every_rank=True)
            continue
        mismatch = run_dir.identity_mismatch(saved.get("identity"), ident, elastic=elastic(cfg))
        if mismatch is not None:
            raise run_dir.RunDirError(f"{checkpoint_path(cfg, rank, step, store=store)} belongs to another run ({mismatch}); resume with "
                                      "the config that wrote it, or start fresh in another out_dir")
        return step, saved
    return -1, None


def checkpoint_path(cfg: DictConfig, rank: int, step: int, *, store: Any = checkpoint) -> str:
    suffix = ".pt" if store is checkpoint else ""
    return f"checkpoint {store.rank_dir(cfg.out_dir, rank) / f'step_{step:08d}{suffix}'}"


def resume_step(cfg: DictConfig, comm: Comm, local: int, *, resume: bool, store: Any = checkpoint) -> int | None:
    """The newest step that every worker can load (agreed with one min all-reduce), or None."""
    agreed = torch.tensor([float(local)])
    comm.all_reduce([agreed], op="min")
    step = int(agreed.item())
    if step < 0:
        if resume and (local >= 0 or store.steps_available(cfg.out_dir, comm.rank)):
            raise run_dir.RunDirError(f"resume=true but some worker has no readable checkpoint of this run in {cfg.out_dir}; "
                                      "set resume=false and choose another out_dir to start over")
        return None
    return step


def join_live_run(comm: Comm, start: int | None, saved: dict | None) -> tuple[int | None, dict | None]:
    """A worker joining a run under way (elastic backends) takes a live peer's current state, served
    from that peer's `live_state` at its step boundary, instead of a checkpoint; others keep theirs."""
    live = comm.fetch_state()
    if live is None:
        return start, saved
    run = {**live.get("run", {}), "comm": CommStats().as_dict()}  # this worker's traffic starts now
    return int(live["step"]), {**live, "run": run}


def live_state(step: int, parts: dict[str, Any]) -> dict[str, Any]:
    """What a joining peer adopts (`Comm.serve_state`): a checkpoint's parts, live, at the boundary after ``step``."""
    return {"step": step, **{name: part.state_dict() for name, part in parts.items()}}
