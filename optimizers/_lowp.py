"""fp32 master weights for bfloat16/float16 parameters, for optimizers whose updates are far smaller
than the parameters' rounding step (DoG's first steps, Mechanic's small scale s).

Such an update applied in bf16 rounds to nothing, so the parameter never moves. For a
low-precision parameter the optimizer keeps ``state[p]["master"]`` in float32, computes on it
with a float32 copy of the gradient, and writes the rounded result back into ``p``. A value
written into ``p`` from outside (a checkpoint, DiLoCo resetting θ to φ) wins: wherever ``p`` no
longer equals the rounded master, the master takes ``p``'s value. Private to the package.
"""
from __future__ import annotations

from itertools import chain
from typing import Any, Sequence

import torch
from torch import Tensor

LOW_PRECISION = (torch.float16, torch.bfloat16)


def is_low(p: Tensor) -> bool:
    return p.dtype in LOW_PRECISION


def master(state: dict[str, Any], p: Tensor) -> Tensor:
    """The tensor the optimizer computes on: ``p`` itself, or its float32 master (made or re-synced)."""
    if not is_low(p):
        return p
    m = state.get("master")
    if m is None:
        m = state["master"] = p.detach().float()
    else:
        torch.where(p == m.to(p.dtype), m, p.float(), out=m)
    return m


def grad(p: Tensor) -> Tensor:
    """``p.grad`` in the dtype of what `master` returns for ``p``."""
    assert p.grad is not None
    return p.grad.float() if is_low(p) else p.grad


def write_back(ps: Sequence[Tensor], states: Sequence[dict[str, Any]]) -> None:
    """Round the masters of low-precision parameters into the parameters."""
    for p, st in zip(ps, states):
        if is_low(p) and "master" in st:
            p.copy_(st["master"])


def float_state(value: Tensor, p: Tensor) -> Tensor:
    """A new state tensor for ``p`` in the dtype its update is computed in."""
    return value.detach().to(torch.float32, copy=True) if is_low(p) else value.detach().clone(memory_format=torch.preserve_format)


def restore_fp32(optimizer: torch.optim.Optimizer, state_dict: dict[str, Any], keys: Sequence[str]) -> None:
    """Undo torch's load_state_dict cast of float32 state to a low-precision parameter's dtype."""
    saved = state_dict["state"]
    ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
    params = chain.from_iterable(g["params"] for g in optimizer.param_groups)
    for idx, p in zip(ids, params):
        if not is_low(p) or idx not in saved:
            continue
        for key in keys:
            value = saved[idx].get(key)
            if isinstance(value, Tensor):
                optimizer.state[p][key] = value.to(device=p.device, dtype=torch.float32)
