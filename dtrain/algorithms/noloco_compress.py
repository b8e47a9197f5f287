"""Wire formats for NoLoCo's exchange: the vector's own dtype (exact), bf16, and int8 with one fp32
scale per block. NoLoCo encodes each dtype group of the parameters on its own.

An int8 payload is a single int8 tensor: the quantized values followed by the per-block fp32
scales reinterpreted as bytes. Its size depends only on the element count, so both partners of
an exchange agree on the shape without talking.

int8 bytes per element: 1 + 4/block (block 64: 1.0625, i.e. 0.266x fp32).
Rounding is to nearest (deterministic), so a resumed run reproduces the same messages.
"""

from __future__ import annotations

import torch

MODES = ("none", "bf16", "int8")


class DecodeError(ValueError):
    """A received payload decodes to something unusable (non-finite or negative scales, NaN)."""


def wire_numel(numel: int, mode: str, block: int) -> int:
    """Elements of the wire tensor for a flat vector of ``numel`` elements."""
    if mode == "int8":
        blocks = -(-numel // block)
        return blocks * block + 4 * blocks
    return numel


def encode(flat: torch.Tensor, mode: str, *, block: int = 64) -> torch.Tensor:
    """``flat`` (1-D float) as the tensor that goes on the wire."""
    if mode == "none":  # exact: the vector's own dtype (fp32, float64, bf16, ...)
        return flat
    if mode == "bf16":
        return flat.to(torch.bfloat16)
    if mode != "int8":
        raise ValueError(f"compression must be one of {MODES}, got {mode!r}")
    numel = flat.numel()
    blocks = -(-numel // block)
    padded = torch.zeros(blocks * block, dtype=torch.float32, device=flat.device)
    padded[:numel] = flat
    rows = padded.view(blocks, block)
    scales = rows.abs().amax(dim=1) / 127.0
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    values = torch.round(rows / safe[:, None]).clamp_(-127, 127).to(torch.int8)
    return torch.cat([values.reshape(-1), scales.contiguous().view(torch.int8)])


def decode(wire: torch.Tensor, numel: int, mode: str, *, block: int = 64) -> torch.Tensor:
    """The vector a wire tensor stands for (``none``: the wire itself; else fp32); raises
    DecodeError on a malformed payload."""
    if mode == "none":
        out = wire
    elif mode == "bf16":
        out = wire.float()
    else:
        blocks = -(-numel // block)
        if wire.dtype != torch.int8 or wire.numel() != blocks * block + 4 * blocks:
            raise DecodeError(f"int8 payload of {wire.numel()} {wire.dtype} elements, expected {blocks * block + 4 * blocks} int8")
        values = wire[: blocks * block].view(blocks, block).float()
        scales = wire[blocks * block :].contiguous().view(torch.float32)
        if not bool(torch.isfinite(scales).all()) or bool((scales < 0).any()):
            raise DecodeError("int8 payload has non-finite or negative block scales")
        out = (values * scales[:, None]).reshape(-1)[:numel]
    if not bool(torch.isfinite(out).all()):
        raise DecodeError("payload decodes to non-finite values")
    return out


def relative_error(flat: torch.Tensor, mode: str, *, block: int = 64) -> float:
    """||decode(encode(x)) - x|| / ||x||: the error one trip over the wire adds (0 for fp32)."""
    if mode == "none":
        return 0.0
    back = decode(encode(flat, mode, block=block), flat.numel(), mode, block=block)
    norm = float(flat.norm())
    return float((back - flat).norm()) / norm if norm > 0 else 0.0
