"""Build the inner optimizer and its learning-rate schedule from `OptimConfig`."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

TORCH_OPTIMIZERS = ("adamw", "sgd")
DEFAULT_LR = 3e-3  # adamw and sgd when optim.lr is not set


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices only: biases, norms and embeddings-by-convention stay undecayed."""
    decay, no_decay = [], []
    for p in model.parameters():
        (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def preset_of(cfg: Any) -> dict[str, Any]:
    """The named hyperparameter point ``optim.preset`` selects ({} when none)."""
    if not cfg.preset:
        return {}
    import optimizers

    if cfg.preset not in optimizers.PRESETS:
        raise ValueError(f"optim.preset={cfg.preset!r} is not known; choose one of {sorted(optimizers.PRESETS)}")
    return dict(optimizers.PRESETS[cfg.preset])


def build_optimizer(cfg: Any, model: nn.Module) -> torch.optim.Optimizer:
    # Groups carry weight decay, so a preset's value must go there or it would be overridden.
    groups = param_groups(model, preset_of(cfg).get("weight_decay", cfg.weight_decay))
    lr = DEFAULT_LR if cfg.lr is None else cfg.lr
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(cfg.betas), eps=cfg.eps, foreach=True)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, foreach=True)
    import optimizers  # the learning-rate-free package, optional at import time of dtrain

    names = tuple(TORCH_OPTIMIZERS) + tuple(getattr(optimizers, "OPTIMIZERS", ()))
    if cfg.name not in names:
        raise ValueError(f"optim.name={cfg.name!r} is not known; choose one of {sorted(names)}")
    # Learning-rate-free methods keep their own default lr (1.0 for most) unless one is given.
    hyper: dict[str, Any] = {} if cfg.lr is None else {"lr": cfg.lr}
    return optimizers.create(cfg.name, groups, preset=cfg.preset, **hyper)


def warmup_steps(cfg: Any, total_steps: int) -> int:
    """optim.warmup_steps, or a preset's warmup_fraction of the run."""
    fraction = preset_of(cfg).get("warmup_fraction")
    return cfg.warmup_steps if fraction is None else round(fraction * total_steps)


def lr_lambda(cfg: Any, total_steps: int):
    """Multiplier of the peak lr at each step: linear warm-up, then cosine/linear/constant to min_lr_ratio."""
    warm = min(warmup_steps(cfg, total_steps), max(total_steps - 1, 0))
    floor = cfg.min_lr_ratio

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if cfg.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warm) / max(1, total_steps - warm))
        if cfg.schedule == "linear":
            return floor + (1 - floor) * (1 - progress)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def build_scheduler(cfg: Any, optimizer: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total_steps))
