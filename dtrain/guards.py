"""What keeps a run from going on silently wrong: streaks of skipped updates, non-finite weights
before a checkpoint, and configs that ask for something the run will not do (a warning each)."""

from __future__ import annotations

import math
from typing import Any

import torch
from omegaconf import DictConfig

from dtrain.comm.flat import local
from dtrain.device import kind
from dtrain.report import RunNotes
from dtrain.run_start import elastic


class TrainingError(RuntimeError):
    """The run cannot go on; the message says why and what to change."""


class NonfiniteGuard:
    """Stops a run whose updates keep being skipped, naming the cause: this worker's own NaN/Inf
    losses, or NaN/Inf in what the other workers sent (our loss finite, the update skipped)."""

    def __init__(self, limit: int, rank: int) -> None:
        self.limit, self.rank = limit, rank
        self.own = self.peers = 0

    def observe(self, step: int, loss: float, *, skipped: bool, talked: bool) -> None:
        if not math.isfinite(loss):
            self.own += 1
            if self.own >= self.limit:
                raise TrainingError(f"loss was NaN/Inf for {self.own} consecutive steps (rank {self.rank}, step {step}); "
                                    "lower optim.lr, enable optim.grad_clip, or check the data")
            return
        self.own = 0
        # Counted over communication rounds, so an outer step skipped every H steps is caught as
        # surely as a skipped DDP step.
        if skipped:
            self.peers += 1
        elif talked:
            self.peers = 0
        if self.peers >= self.limit:
            raise TrainingError(
                f"the update was skipped for {self.peers} consecutive rounds (rank {self.rank}, step {step}) because what "
                "other workers sent was NaN/Inf while this worker's loss was finite; find the worker whose loss is NaN "
                "(its log names it) and fix its data or hardware")


def skipped_updates(algo: Any) -> int:
    """Updates the algorithm skipped on every worker together (steps, or outer syncs)."""
    return int(getattr(algo, "skipped_steps", 0)) + int(getattr(algo, "skipped_syncs", 0))


MULTI_WORKER = ("ddp", "diloco", "noloco", "hdet", "streaming_diloco", "streaming_noloco")  # methods that do nothing a single worker would not


def warn_noops(cfg: DictConfig, world: int, workload: Any, notes: RunNotes) -> None:
    """One warning line for each thing the config asks for that this run will not do."""
    for message in workload.notes:
        notes.warn(message)
    for key in ("sync_every", "converge_every"):
        every = cfg.algo.get(key)
        if every and every > cfg.steps:
            notes.warn(f"algo.{key}={every} > steps={cfg.steps}: no worker ever communicates, so this run is "
                       f"{world} independent local trainings; lower algo.{key} or raise steps")
    if cfg.algo.get("outer_device") == "cpu" and kind(cfg.get("device", "auto")) != "cuda":
        notes.warn("algo.outer_device=cpu while the model is on the CPU (device=cpu, or no CUDA): the parameters are in "
                   "host memory already, so the outer state stays where it was; drop algo.outer_device here")
    if world == 1 and cfg.algo.name in MULTI_WORKER and not elastic(cfg):
        notes.warn(f"algo.name={cfg.algo.name} with 1 worker does what plain local training does; "
                   "launch several workers (torchrun --nproc-per-node N, or comm.name=local comm.workers=N)")


def refuse_nonfinite_weights(model: torch.nn.Module, rank: int, step: int) -> None:
    bad = [name for name, p in model.named_parameters() if not bool(torch.isfinite(local(p)).all())]  # a shard: DTensor
    if bad:
        raise TrainingError(f"weights became NaN/Inf by step {step} on rank {rank} ({bad[0]}); not checkpointing them: "
                            "resume=true continues from the last good checkpoint; lower optim.lr or enable optim.grad_clip")
