"""What HDET's replicas exchange at a converge or selection step: averages, scores, a winner's state.

Every function here is a collective: every replica calls it at the same step, with tensors of the
same shapes in the same order.
"""

from __future__ import annotations

import torch

from dtrain.algorithms.base import optimizer_params
from dtrain.comm.base import Comm


def by_dtype(tensors: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """One collective per dtype (Comm fuses a call into one buffer of a single dtype)."""
    out: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        out.setdefault(t.dtype, []).append(t)
    return list(out.values())


def broadcast_from(comm: Comm, tensors: list[torch.Tensor], src: int) -> None:
    """Every replica takes replica ``src``'s values of ``tensors``."""
    for group in by_dtype(tensors):
        comm.broadcast(group, src=src)


def average_finite(comm: Comm, tensors: list[torch.Tensor]) -> None:
    """Mean over the replicas whose tensors are finite (one all-reduce per dtype; a count rides along).

    A replica that diverged contributes nothing and receives the others' mean, so NaN/Inf never
    spreads through the average.
    """
    for group in by_dtype(tensors):
        finite = all(bool(torch.isfinite(t).all()) for t in group)
        count = torch.ones(1, dtype=group[0].dtype, device=group[0].device)
        if not finite:
            for t in group:
                t.zero_()
            count.zero_()
        comm.all_reduce([*group, count], op="sum")
        if count.item() > 0:
            for t in group:
                t.div_(count)


def share_scores(comm: Comm, mine: float | None) -> list[float | None]:
    """Every replica's score (None where a replica had none), in one small all-reduce."""
    n, rank = comm.world_size, comm.rank
    buf = torch.zeros(2 * n, dtype=torch.float64)
    if mine is not None:
        buf[rank] = mine
        buf[n + rank] = 1.0
    if n > 1:
        comm.all_reduce([buf], op="sum")
    return [float(buf[r]) if buf[n + r] > 0 else None for r in range(n)]


def optimizer_state(optimizer: torch.optim.Optimizer, *, scalars: bool = False) -> list[torch.Tensor]:
    """The optimizer's floating-point state tensors (with ``scalars``, 0-dim ones such as step too)."""
    out = []
    for p in optimizer_params(optimizer):
        for key, value in sorted(optimizer.state.get(p, {}).items()):
            if not isinstance(value, torch.Tensor) or not value.is_floating_point():
                continue
            if scalars or (key != "step" and value.dim() > 0):
                out.append(value)
    return out
