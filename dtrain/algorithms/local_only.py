"""No synchronisation: each worker trains alone (the single-process baseline, or N independent runs)."""

from __future__ import annotations

from dataclasses import dataclass

from dtrain.algorithms.base import AttachContext, Attached, OptimizerHook


@dataclass
class Config:
    name: str = "none"


def attach(cfg: Config, ctx: AttachContext) -> Attached:
    return Attached(algorithm=OptimizerHook(ctx.optimizer, ctx.comm))
