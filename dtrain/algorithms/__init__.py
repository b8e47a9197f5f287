"""Training algorithms as hooks on the user's own optimizer (or, for SPSA, as the optimizer)."""

from dtrain.algorithms.base import Algorithm, AttachContext, Attached, OptimizerHook, optimizer_params
from dtrain.algorithms.ddp import DDP
from dtrain.algorithms.diloco import DiLoCo
from dtrain.algorithms.noloco import NoLoCo

__all__ = ["DDP", "Algorithm", "AttachContext", "Attached", "DiLoCo", "NoLoCo", "OptimizerHook", "optimizer_params"]
