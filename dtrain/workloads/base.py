"""The workload interface: model init, a deterministic data stream, a loss, a metric, a target."""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from dtrain.seeding import generator, stream_seed  # re-exported: workloads and tests import them from here

__all__ = ["Sample", "Workload", "generator", "stream_seed"]


@dataclass(frozen=True)
class Sample:
    """Text a trained model wrote after ``prompt`` (a snippet of the validation text)."""

    prompt: str
    continuation: str
    length: int  # tokens generated (bytes, for a byte-level model)
    seed: int
    temperature: float  # 0 = greedy

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Workload(ABC):
    """One AlgoPerf-style problem.

    Subclasses set ``name``, ``metric`` (the validation metric's name), ``higher_is_better``,
    ``target`` (what a tuned NAdamW baseline reaches in ``time_budget_s``) and ``time_budget_s``.
    Batches are a pure function of (seed, step, rank), so a resumed run sees the same data.
    """

    name: str = ""
    metric: str = "val_loss"
    higher_is_better: bool = False
    target: float = float("nan")
    time_budget_s: float = 120.0

    def __init__(self, cfg: Any, *, seed: int) -> None:
        self.cfg = cfg
        self.seed = seed
        self.notes: list[str] = []  # what the run should be warned of (e.g. data that is not text)
        # A workload's config may set its target and budget (e.g. for a scaled-down model).
        if getattr(cfg, "target", None) is not None:
            self.target = float(cfg.target)
        if getattr(cfg, "time_budget_s", None) is not None:
            self.time_budget_s = float(cfg.time_budget_s)

    @abstractmethod
    def build_model(self) -> nn.Module:
        """The model, initialised from ``self.seed`` alone (every worker builds the same one)."""

    @abstractmethod
    def train_batch(self, step: int, rank: int, world_size: int) -> Any:
        """Worker ``rank``'s batch at ``step``: deterministic in (seed, step, rank)."""

    @abstractmethod
    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """Scalar training loss (mean over the batch)."""

    @abstractmethod
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Validation results; must contain ``self.metric`` (and ``val_loss`` where it makes sense)."""

    def sample(self, model: nn.Module, *, length: int = 120, seed: int = 0, temperature: float = 0.8) -> Sample | None:
        """What ``model`` generates from a prompt taken from the validation data, deterministic in
        ``seed``; None for workloads whose models do not generate (the default: most only score)."""
        return None

    def note(self, message: str) -> None:
        """Record a warning for whoever runs this workload (`dtrain train` prints it and lists it in
        summary.json) and log it for library users."""
        self.notes.append(message)
        logging.getLogger(type(self).__module__).warning(message)

    def reached(self, value: float) -> bool:
        return value >= self.target if self.higher_is_better else value <= self.target
