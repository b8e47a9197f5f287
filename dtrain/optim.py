"""Build the inner optimizer and its learning-rate schedule from `OptimConfig`."""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn

TORCH_OPTIMIZERS = {"adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}
# dtrain's own points for torch's optimizers (the learning-rate-free ones keep their published defaults).
ENGINE_DEFAULTS: dict[str, dict[str, Any]] = {
    "adamw": {"lr": 3e-3, "betas": (0.9, 0.95), "eps": 1e-8},
    "sgd": {"lr": 3e-3, "momentum": 0.9},
}
HYPER_KEYS = ("lr", "betas", "eps", "momentum")  # optim keys that go to the constructor when set


def optimizer_class(name: str) -> type[torch.optim.Optimizer]:
    if name in TORCH_OPTIMIZERS:
        return TORCH_OPTIMIZERS[name]
    import optimizers  # the learning-rate-free package, optional at import time of dtrain

    classes = getattr(optimizers, "_CLASSES", {})
    if name not in classes:
        raise ValueError(f"optim.name={name!r} is not known; choose one of {sorted([*TORCH_OPTIMIZERS, *classes])}")
    return classes[name]


def constructor_kwargs(cfg: Any) -> dict[str, Any]:
    """What the optimizer constructor gets beyond the param groups: engine defaults for torch's
    optimizers, then every optim key the user set (lr, betas, eps, momentum, kwargs.*)."""
    hyper = dict(ENGINE_DEFAULTS.get(cfg.name, {}))
    for key in HYPER_KEYS:
        value = cfg.get(key)
        if value is not None:
            hyper[key] = tuple(value) if key == "betas" else value
    extra = cfg.get("kwargs") or {}
    extra = OmegaConf.to_container(extra) if OmegaConf.is_config(extra) else dict(extra)
    hyper.update({k: tuple(v) if isinstance(v, list) else v for k, v in extra.items()})
    return hyper


def check_reaches_constructor(cfg: Any) -> None:
    """Refuse an optim key the chosen optimizer would not receive (one line naming it)."""
    cls = optimizer_class(cfg.name)
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "params")]
    user = [k for k in HYPER_KEYS if cfg.get(k) is not None] + [f"kwargs.{k}" for k in (cfg.get("kwargs") or {})]
    for key in user:
        name = key.removeprefix("kwargs.")
        if name not in accepted:
            raise ValueError(f"optim.{key} does not reach {cfg.name} ({cls.__name__} takes {', '.join(accepted)}); "
                             "remove it or pick an optimizer that has it")
        if name in ("params", "weight_decay"):
            raise ValueError(f"optim.{key}: set optim.{name} itself, not through kwargs")


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


def build_optimizer(cfg: Any, model: nn.Module, **extra: Any) -> torch.optim.Optimizer:
    """``extra``: constructor arguments the loop decides (a sharded worker's ``process_group``)."""
    # Groups carry weight decay, so a preset's value must go there or it would be overridden.
    groups = param_groups(model, preset_of(cfg).get("weight_decay", cfg.weight_decay))
    hyper = {**constructor_kwargs(cfg), **extra}
    if cfg.name in TORCH_OPTIMIZERS:
        return TORCH_OPTIMIZERS[cfg.name](groups, foreach=True, **hyper)
    import optimizers

    optimizer_class(cfg.name)  # a one-line error for an unknown name
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
