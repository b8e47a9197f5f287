"""Training algorithms as hooks on the user's own optimizer (or, for SPSA, as the optimizer)."""

from dtrain.algorithms.base import AttachContext, Attached, OptimizerHook, optimizer_params
from dtrain.algorithms.ddp import DDP
from dtrain.algorithms.diloco import DiLoCo

__all__ = ["DDP", "AttachContext", "Attached", "DiLoCo", "OptimizerHook", "optimizer_params"]
