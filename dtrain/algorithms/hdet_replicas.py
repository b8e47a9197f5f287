"""What HDET's replicas exchange at a converge or selection step: averages, scores, a winner's state.

Every function here is a collective: every replica calls it at the same step, with tensors of the
same shapes in the same order.
"""

from __future__ import annotations

from typing import Any

import torch

from dtrain.algorithms.base import all_finite, locals_, optimizer_params
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
        shards = locals_(group)  # a sharded worker's DTensors: their shards (its processes agree on finite)
        finite = all_finite(comm, shards)
        count = torch.ones(1, dtype=group[0].dtype, device=group[0].device)
        if not finite:
            for t in shards:
                t.zero_()
            count.zero_()
        comm.all_reduce([*group, count], op="sum")
        if count.item() > 0:
            for t in shards:
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


def optimizer_state(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The optimizer's floating-point state tensors that have a shape (not step or other 0-dim ones)."""
    out = []
    for p in optimizer_params(optimizer):
        for key, value in sorted(optimizer.state.get(p, {}).items()):
            if not isinstance(value, torch.Tensor) or not value.is_floating_point():
                continue
            if key != "step" and value.dim() > 0:
                out.append(value)
    return out


def load_optimizer_from(comm: Comm, optimizer: torch.optim.Optimizer, src: int) -> None:
    """Every replica takes replica ``src``'s whole optimizer state.

    Read through ``state_dict`` so that state kept outside the per-parameter tensors travels too:
    Prodigy's and D-Adaptation's d in the param groups, Mechanic's tuner and its base optimizer's
    state. Tensors go by broadcast (one per dtype); numbers (ints and floats, not bools) in one
    float64 broadcast. Every replica built the same optimizer and stepped it as often, so the
    state dicts have the same layout.
    """
    state = optimizer.state_dict()
    tensors: list[torch.Tensor] = []
    numbers: list[float] = []
    _collect(state, tensors, numbers)
    # state_dict hands out the live tensors: a broadcast that fails must not leave them half-written
    tensors = [t.clone() for t in tensors]
    broadcast_from(comm, tensors, src)
    flat = torch.tensor(numbers, dtype=torch.float64)
    if numbers:
        comm.broadcast([flat], src=src)
    optimizer.load_state_dict(_rebuild(state, iter(tensors), iter(flat.tolist())))


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _is_tensor(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and not x.is_complex() and x.dtype != torch.bool


def _keys(d: dict) -> list:
    # same order on every replica whatever the insertion order; "params" (indices) is layout, not state
    return sorted((k for k in d if k != "params"), key=lambda k: (type(k).__name__, repr(k)))


def _collect(tree: Any, tensors: list[torch.Tensor], numbers: list[float]) -> None:
    if _is_tensor(tree):
        tensors.append(tree)
    elif _is_number(tree):
        numbers.append(float(tree))
    elif isinstance(tree, dict):
        for k in _keys(tree):
            _collect(tree[k], tensors, numbers)
    elif isinstance(tree, (list, tuple)):
        for x in tree:
            _collect(x, tensors, numbers)


def _rebuild(tree: Any, tensors: Any, numbers: Any) -> Any:
    if _is_tensor(tree):
        return next(tensors)
    if _is_number(tree):
        x = next(numbers)
        return int(x) if isinstance(tree, int) else x
    if isinstance(tree, dict):
        out = dict(tree)
        for k in _keys(tree):
            out[k] = _rebuild(tree[k], tensors, numbers)
        return out
    if isinstance(tree, (list, tuple)):
        return type(tree)(_rebuild(x, tensors, numbers) for x in tree)
    return tree
