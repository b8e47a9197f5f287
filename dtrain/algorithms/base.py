"""What every algorithm shares: hooks on the user's optimizer, and what `attach` returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from dtrain.comm.base import Comm


def optimizer_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The parameters an algorithm acts on, found through the optimizer's own param_groups."""
    seen: set[int] = set()
    out = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


class OptimizerHook:
    """Base for algorithms that ride on a user's optimizer via its step pre/post hooks.

    Subclasses override `before_step` (runs inside ``optimizer.step()`` before the update; may
    set grads to None to skip the update, which torch optimizers honour) and/or `after_step`.
    ``step`` counts every ``optimizer.step()`` call, including skipped ones, so workers that skip
    a step on a NaN loss stay in lock-step with the others.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, comm: Comm) -> None:
        self.optimizer = optimizer
        self.comm = comm
        self.step = 0
        self.skipped_steps = 0
        self._hooks = [
            optimizer.register_step_pre_hook(lambda *_: self.before_step()),
            optimizer.register_step_post_hook(lambda *_: self._after()),
        ]

    @property
    def params(self) -> list[torch.Tensor]:
        return optimizer_params(self.optimizer)

    def before_step(self) -> None:
        pass

    def after_step(self) -> None:
        pass

    def _after(self) -> None:
        self.step += 1
        self.after_step()

    def skip_update(self) -> None:
        """Make the pending ``optimizer.step()`` a no-op on parameters (grads set to None)."""
        for p in self.params:
            p.grad = None
        self.skipped_steps += 1

    def remove(self) -> None:
        """Detach from the optimizer; the optimizer behaves as if never hooked."""
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.skipped_steps = int(state["skipped_steps"])


@dataclass
class Attached:
    """What an algorithm module's ``attach(...)`` hands the training loop.

    algorithm: has state_dict()/load_state_dict() (checkpointed) and optionally remove()/report().
    scheduler: replaces the loop's default LR schedule (HDET); None keeps the default.
    scheduler_takes_loss: call ``scheduler.step(loss)`` instead of ``scheduler.step()``.
    forward_only: the algorithm is the optimizer: the loop calls ``algorithm.step(closure)``
        with a closure returning the loss (no backward), instead of backward + optimizer.step().
    """

    algorithm: Any
    scheduler: Any = None
    scheduler_takes_loss: bool = False
    forward_only: bool = False
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass
class AttachContext:
    """Everything the training loop knows that an algorithm may need when it attaches.

    ``lr`` is the optimizer's peak learning rate from the config; ``total_steps`` the run length.
    """

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    comm: Comm
    seed: int
    total_steps: int
    lr: float
    workload: Any = None
    loss_fn: Any = None  # loss_fn(model, batch) -> scalar tensor, for forward-only algorithms
