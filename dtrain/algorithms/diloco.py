"""DiLoCo (Douillard et al. 2023): local inner steps, an outer Nesterov step every H steps.

Every ``sync_every`` inner steps: Δ = mean_i(φ − θ_i) by one all-reduce, φ ← OuterSGD(φ, Δ),
θ_i ← φ. The outer optimizer is torch's SGD over a copy φ of the parameters, so with
``outer_lr=1, outer_momentum=0`` DiLoCo is plain parameter averaging every H steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from dtrain.algorithms.base import AttachContext, Attached, OptimizerHook
from dtrain.comm.base import Comm


@dataclass
class Config:
    name: str = "diloco"
    sync_every: int = 500
    outer_lr: float = 0.7
    outer_momentum: float = 0.9
    nesterov: bool = True
    broadcast_init: bool = True


def validate(cfg: Config) -> None:
    if cfg.sync_every < 1:
        raise ValueError(f"algo.sync_every must be >= 1, got {cfg.sync_every}")
    if cfg.outer_lr <= 0:
        raise ValueError(f"algo.outer_lr must be > 0, got {cfg.outer_lr}")
    if not 0 <= cfg.outer_momentum < 1:
        raise ValueError(f"algo.outer_momentum must be in [0, 1), got {cfg.outer_momentum}")
    if cfg.nesterov and cfg.outer_momentum == 0:
        raise ValueError("algo.nesterov=true needs algo.outer_momentum > 0 (set algo.nesterov=false)")


class DiLoCo(OptimizerHook):
    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        comm: Comm,
        *,
        sync_every: int = 500,
        outer_lr: float = 0.7,
        outer_momentum: float = 0.9,
        nesterov: bool = True,
        broadcast_init: bool = True,
    ) -> None:
        validate(Config(sync_every=sync_every, outer_lr=outer_lr, outer_momentum=outer_momentum, nesterov=nesterov))
        super().__init__(optimizer, comm)
        self.sync_every = sync_every
        self.outer_syncs = 0
        self.skipped_syncs = 0
        params = self.params
        if broadcast_init:
            with torch.no_grad():
                comm.broadcast(params, src=0)
        # φ: the slow weights, a copy of the fast weights at the last sync; outer grads live in φ.grad.
        self.outer_params = [p.detach().clone() for p in params]
        for phi in self.outer_params:
            phi.grad = torch.zeros_like(phi)
        self.outer_optimizer = torch.optim.SGD(
            self.outer_params, lr=outer_lr, momentum=outer_momentum, nesterov=nesterov
        )

    def after_step(self) -> None:
        if self.step % self.sync_every == 0:
            self.sync()

    @torch.no_grad()
    def sync(self) -> None:
        """The outer step: average the pseudo-gradients, step φ, reset θ to φ."""
        params = self.params
        deltas = [phi.grad for phi in self.outer_params]
        torch._foreach_copy_(deltas, self.outer_params)
        torch._foreach_sub_(deltas, [p.detach() for p in params])
        self.comm.all_reduce(deltas, op="mean")
        if not all(bool(torch.isfinite(d).all()) for d in deltas):
            # Every worker sees the same reduced Δ, so every worker skips together.
            self.skipped_syncs += 1
        else:
            self.outer_optimizer.step()
            self.outer_syncs += 1
        torch._foreach_copy_([p.detach() for p in params], self.outer_params)

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "outer_syncs": self.outer_syncs,
            "skipped_syncs": self.skipped_syncs,
            "outer_params": [phi.detach().clone() for phi in self.outer_params],
            "outer_optimizer": self.outer_optimizer.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.outer_syncs = int(state["outer_syncs"])
        self.skipped_syncs = int(state["skipped_syncs"])
        with torch.no_grad():
            for phi, saved in zip(self.outer_params, state["outer_params"], strict=True):
                phi.copy_(saved)
        self.outer_optimizer.load_state_dict(state["outer_optimizer"])

    def report(self) -> dict[str, Any]:
        return {"outer_syncs": self.outer_syncs, "skipped_syncs": self.skipped_syncs}


def attach(cfg: Config, ctx: AttachContext) -> Attached:
    validate(cfg)
    algo = DiLoCo(
        ctx.optimizer,
        ctx.comm,
        sync_every=cfg.sync_every,
        outer_lr=cfg.outer_lr,
        outer_momentum=cfg.outer_momentum,
        nesterov=cfg.nesterov,
        broadcast_init=cfg.broadcast_init,
    )
    return Attached(algorithm=algo)
