"""Flattening and dtype grouping: how the comm layer turns a list of tensors into wire buffers.

Every backend moves one contiguous buffer per transfer. Tensors of one dtype are concatenated;
a list of mixed dtypes (a model with fp32 and bf16 parameters) is split into dtype groups,
in order of first appearance, so every worker that passes the same list forms the same groups.
Reductions need arithmetic, so `Comm` runs one collective per group; transfers that only move
bytes (exchange, all_gather) `pack` the groups' raw bytes into one uint8 buffer instead.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def local(t: torch.Tensor) -> torch.Tensor:
    """This process's shard of a DTensor (a sharded parameter of FSDP2, its grad, its optimizer
    state), sharing its storage so in-place writes reach the parameter; any other tensor as is.
    Every transfer moves local shards: a sharded worker's outer traffic per process is its shard."""
    if not hasattr(t, "device_mesh"):
        return t
    with torch.no_grad():
        return t.to_local()


def locals_(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [local(t) for t in tensors]


def like(values: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``values`` (shaped like ``local(param)``) as a tensor sharded like ``param``: for a DTensor
    parameter a DTensor on its mesh with its placements (so a checkpoint can reshard it); else as is."""
    if not hasattr(param, "device_mesh"):
        return values
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(values, param.device_mesh, param.placements, run_check=False, shape=param.shape,
                              stride=param.stride())


def flat_nbytes(tensors: Sequence[torch.Tensor]) -> int:
    return sum(local(t).numel() * t.element_size() for t in tensors)


def flatten(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """One contiguous buffer so a call is one transfer, not one per tensor."""
    tensors = locals_(tensors)
    if len(tensors) == 1:
        return tensors[0].detach().reshape(-1).clone()
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def unflatten_into(flat: torch.Tensor, tensors: Sequence[torch.Tensor]) -> None:
    tensors = locals_(tensors)
    offset = 0
    with torch.no_grad():
        for t in tensors:
            n = t.numel()
            t.copy_(flat[offset : offset + n].view_as(t))
            offset += n


def split_like(flat: torch.Tensor, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    tensors = locals_(tensors)
    out, offset = [], 0
    for t in tensors:
        n = t.numel()
        out.append(flat[offset : offset + n].view(t.shape))
        offset += n
    return out


def group_by_dtype(tensors: Sequence[torch.Tensor]) -> list[list[int]]:
    """Indices of ``tensors`` grouped by dtype, groups in order of first appearance (so every worker
    that passes the same list agrees); an empty list is one empty group."""
    groups: dict[torch.dtype, list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault(t.dtype, []).append(i)
    return list(groups.values()) or [[]]


def pack(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """One flat buffer for a transfer: the tensors' own dtype if they share one, else the raw bytes
    (uint8) of each dtype group's flat buffer, groups in `group_by_dtype` order."""
    groups = group_by_dtype(tensors)
    if len(groups) == 1:
        return flatten(tensors)
    return torch.cat([flatten([tensors[i] for i in idx]).view(torch.uint8) for idx in groups])


def unpack(flat: torch.Tensor, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """`pack`'s inverse: tensors shaped and typed like ``tensors``, in their order."""
    groups = group_by_dtype(tensors)
    if len(groups) == 1:
        return split_like(flat, tensors)
    out: list[torch.Tensor | None] = [None] * len(tensors)
    offset = 0
    for idx in groups:
        like = [tensors[i] for i in idx]
        n = flat_nbytes(like)
        # a copy: a dtype group may start at a byte offset its element size does not divide
        part = flat[offset : offset + n].clone().view(like[0].dtype)
        offset += n
        for i, piece in zip(idx, split_like(part, like)):
            out[i] = piece
    return out  # type: ignore[return-value]
