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


class OuterState:
    """φ per parameter (with Δ in ``φ.grad``) on the outer device; momentum follows φ (torch's SGD
    allocates it beside φ)."""

    def __init__(self, params: Sequence[torch.Tensor], where: str) -> None:
        self.where = where
        self.phi = [outer_copy(p, where) for p in params]
        for phi in self.phi:
            phi.grad = torch.zeros_like(phi)

    def grads(self, idx: Sequence[int]) -> list[torch.Tensor]:
        return [self.phi[i].grad for i in idx]  # type: ignore[misc]

    @torch.no_grad()
    def deltas(self, params: Sequence[torch.Tensor], idx: Sequence[int]) -> list[torch.Tensor]:
        """Δ = φ − θ for the parameters ``idx``, written into (and returned as) their φ.grad."""
        deltas = self.grads(idx)
        torch._foreach_copy_(deltas, [self.phi[i] for i in idx])
        torch._foreach_sub_(deltas, [params[i].detach().to(self.phi[i].device, non_blocking=True) for i in idx])
        return deltas

    @torch.no_grad()
    def mix_into(self, params: Sequence[torch.Tensor], idx: Sequence[int], alpha: float) -> None:
        """θ ← α·θ + (1 − α)·φ for the parameters ``idx`` (α = 0: θ ← φ exactly)."""
        thetas = [params[i].detach() for i in idx]
        phis = [self.phi[i].to(params[i].device, non_blocking=True) for i in idx]
        if alpha == 0:
            torch._foreach_copy_(thetas, phis)
        else:
            torch._foreach_lerp_(thetas, phis, 1.0 - alpha)

    def report(self, extra: Sequence[torch.Tensor] = ()) -> dict[str, Any]:
        """Bytes of outer state (φ, Δ, and ``extra``: momentum, residuals), and how many sit on an accelerator."""
        tensors = [*self.phi, *(p.grad for p in self.phi if p.grad is not None), *extra]
        by_device = resident_bytes(tensors)
        return {"outer_device": self.where, "outer_state_bytes": sum(by_device.values()),
                "outer_state_accelerator_bytes": sum(v for k, v in by_device.items() if k != "cpu")}
