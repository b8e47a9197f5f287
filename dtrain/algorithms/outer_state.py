"""Where outer state lives: the slow weights φ, their outer momentum and Δ (DiLoCo family).

``outer_device="same"`` keeps them beside the parameters; ``"cpu"`` keeps them in host memory
(pinned when CUDA exists, so the copies to and from the accelerator can be asynchronous), as
Prime's trainer does: the outer step then runs on the CPU and costs the accelerator no memory
beyond the parameters themselves. On a machine without an accelerator both are the same memory;
`OuterState.report` says how many bytes of outer state sit on an accelerator either way, which is
what the option saves.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from dtrain.algorithms.base import locals_
from dtrain.algorithms.fragments import Piece, view

OUTER_DEVICES = ("same", "cpu")


def outer_copy(p: torch.Tensor, where: str) -> torch.Tensor:
    """A detached copy of ``p`` where outer state lives (``same``: p's device; ``cpu``: host memory)."""
    if where == "same" or p.device.type == "cpu":
        return p.detach().clone()
    out = torch.empty(p.shape, dtype=p.dtype, pin_memory=torch.cuda.is_available())
    out.copy_(p.detach())
    return out


def resident_bytes(tensors: Sequence[torch.Tensor]) -> dict[str, int]:
    """Bytes of ``tensors`` by device type ("cpu", "cuda", ...)."""
    out: dict[str, int] = {}
    for t in tensors:
        out[t.device.type] = out.get(t.device.type, 0) + t.numel() * t.element_size()
    return out


def state_report(where: str, tensors: Sequence[torch.Tensor]) -> dict[str, Any]:
    """``report()`` keys: where outer state lives, its bytes, and how many of them sit on an accelerator."""
    by_device = resident_bytes(tensors)
    return {"outer_device": where, "outer_state_bytes": sum(by_device.values()),
            "outer_state_accelerator_bytes": sum(v for k, v in by_device.items() if k != "cpu")}


class OuterState:
    """φ per parameter on the outer device, seen through one view per fragment piece (with Δ in the
    view's ``.grad``); the outer momentum follows the views (torch's SGD allocates it beside them)."""

    def __init__(self, params: Sequence[torch.Tensor], where: str, fragments: Sequence[Sequence[Piece]]) -> None:
        self.where = where
        self.phi = [outer_copy(p, where) for p in params]
        self.fragments = [list(f) for f in fragments]
        self.views = [[view(self.phi[piece[0]], piece) for piece in pieces] for pieces in self.fragments]
        for views in self.views:
            for v in views:
                v.grad = torch.zeros_like(v)

    def grads(self, p: int) -> list[torch.Tensor]:
        """Fragment ``p``'s Δ buffers: local shards where the parameters are DTensors (a sharded worker,
        whose fragments hold whole tensors), so reductions and checks act on this process's shard."""
        return locals_([v.grad for v in self.views[p]])  # type: ignore[misc]

    def _thetas(self, params: Sequence[torch.Tensor], p: int) -> list[torch.Tensor]:
        return locals_([view(params[piece[0]].detach(), piece) for piece in self.fragments[p]])

    @torch.no_grad()
    def deltas(self, params: Sequence[torch.Tensor], p: int) -> list[torch.Tensor]:
        """Δ = φ − θ for fragment ``p``, written into (and returned as) its views' ``.grad``."""
        deltas, views = self.grads(p), locals_(self.views[p])
        torch._foreach_copy_(deltas, views)
        torch._foreach_sub_(deltas, [t.to(v.device, non_blocking=True) for t, v in zip(self._thetas(params, p), views)])
        return deltas

    @torch.no_grad()
    def mix_into(self, params: Sequence[torch.Tensor], p: int, alpha: float) -> None:
        """θ ← α·θ + (1 − α)·φ for fragment ``p`` (α = 0: θ ← φ exactly)."""
        thetas = self._thetas(params, p)
        phis = [v.to(t.device, non_blocking=True) for v, t in zip(locals_(self.views[p]), thetas)]
        if alpha == 0:
            torch._foreach_copy_(thetas, phis)
        else:
            torch._foreach_lerp_(thetas, phis, 1.0 - alpha)

    def report(self, extra: Sequence[torch.Tensor] = ()) -> dict[str, Any]:
        """`state_report` of φ, Δ and ``extra`` (momentum, residuals)."""
        return state_report(self.where, [*self.phi, *(g for p in range(len(self.views)) for g in self.grads(p)), *extra])
