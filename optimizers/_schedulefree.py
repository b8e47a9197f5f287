"""Shared machinery of the Schedule-Free optimizers (Defazio et al., 2024).

The parameters hold y = (1 - beta) * z + beta * x while training (where the
gradient is taken) and x, the averaged iterate, while evaluating. The state
keeps z. ``train()`` / ``eval()`` switch between the two and must mirror the
model's own ``train()`` / ``eval()``.
"""
from __future__ import annotations

from typing import Any

import torch

from ._common import KeepsExtras, by_device_dtype, check_range


class ScheduleFreeBase(KeepsExtras, torch.optim.Optimizer):
    """Base class: train/eval switching and the averaging weight c_{k+1}."""

    _beta_key = "momentum"  # group key of the interpolation constant beta

    @staticmethod
    def _schedule_defaults(name: str, *, weight_decay: float, warmup_steps: int, r: float,
                           weight_lr_power: float) -> dict[str, Any]:
        """The checked settings both Schedule-Free optimizers share, and their per-group step state."""
        check_range(name, "weight_decay", weight_decay, 0.0)
        if not isinstance(warmup_steps, int) or isinstance(warmup_steps, bool) or warmup_steps < 0:
            raise ValueError(f"{name}: invalid warmup_steps={warmup_steps!r}; use an integer >= 0")
        check_range(name, "r", r, 0.0)
        check_range(name, "weight_lr_power", weight_lr_power, 0.0)
        return dict(weight_decay=weight_decay, warmup_steps=warmup_steps, r=r, weight_lr_power=weight_lr_power,
                    k=0, train_mode=True, weight_sum=0.0, lr_max=-1.0, scheduled_lr=0.0)

    def _beta(self, group: dict[str, Any]) -> float:
        b = group[self._beta_key]
        return b[0] if isinstance(b, (tuple, list)) else b

    @torch.no_grad()
    def eval(self) -> None:
        """Put x (the point to evaluate) in the parameters. No-op if already in eval mode."""
        self._switch(to_train=False)

    @torch.no_grad()
    def train(self, mode: bool = True) -> None:
        """Put y (the point to take gradients at) in the parameters; ``train(False)`` is ``eval()``."""
        self._switch(to_train=bool(mode))

    def _switch(self, *, to_train: bool) -> None:
        for group in self.param_groups:
            if group["train_mode"] == to_train:
                continue
            beta = self._beta(group)
            # y -> x: x = y + (1 - 1/beta) (z - y);  x -> y: y = x + (1 - beta) (z - x)
            w = (1.0 - beta) if to_train else (1.0 - 1.0 / beta)
            ps = [p for p in group["params"] if "z" in self.state[p]]
            for _, idx in by_device_dtype(len(ps), lambda i: ps[i]).items():
                sub = [ps[i] for i in idx]
                zs = [self.state[p]["z"] for p in sub]
                if group["foreach"]:
                    torch._foreach_lerp_(sub, zs, w)
                else:
                    for p, z in zip(sub, zs):
                        p.lerp_(z, w)
            group["train_mode"] = to_train

    def _check_train_mode(self) -> None:
        if not all(g["train_mode"] for g in self.param_groups):
            raise RuntimeError(f"{type(self).__name__}.step() called in eval mode; call optimizer.train() "
                               f"(alongside model.train()) before training steps")

    @staticmethod
    def _advance(group: dict[str, Any]) -> tuple[float, float]:
        """Scheduled lr and the weight c_{k+1} of the new point in the running average x."""
        k = group["k"]
        warm = group["warmup_steps"]
        lr = group["lr"] * ((k + 1) / warm if k < warm else 1.0)
        group["scheduled_lr"] = lr
        lr_max = group["lr_max"] = max(lr, group["lr_max"])
        weight = ((k + 1) ** group["r"]) * (lr_max ** group["weight_lr_power"])
        weight_sum = group["weight_sum"] = group["weight_sum"] + weight
        ckp1 = weight / weight_sum if weight_sum != 0 else 0.0
        return lr, ckp1
