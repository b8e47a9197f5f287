"""Wire codecs for outer updates (DiLoCo, Streaming DiLoCo, NoLoCo): what one flat vector becomes on
the wire, its exact size, and the way back. Each codec acts on one 1-D vector (an algorithm passes
one per dtype group of its parameters, so tensors of any rank and mixed dtypes are covered); every
decode returns fp32 (``none`` returns the wire itself), so sums of decoded payloads run in fp32.

Codecs and their wire sizes for a vector of n elements (the byte counters count exactly these):

- ``none``: the vector in its own dtype, n·itemsize bytes (exact);
- ``bf16``: n·2 bytes;
- ``int8``: per block of ``block`` elements one fp32 scale s = max|x|/127 and round(x/s) as int8:
  B·block + 4·B bytes, B = ceil(n/block). One int8 tensor: values, then the scales' bytes;
- ``int4`` (E3M0-style): sign bit + 3-bit exponent code c per element and one fp32 scale
  s = max|x| per block; c = 0 is zero, c = 1..7 is s·2^(c−7) (magnitudes s/64 … s), rounded to the
  nearest level in linear terms (ties up). Two codes per byte, low nibble first:
  ceil(B·block/2) + 4·B bytes (uint8);
- ``topk``: the vector cut into chunks of L = min(chunk, n) elements (the last one zero-padded);
  per chunk the k = ceil(density·L) largest magnitudes are kept, their in-chunk indices sent in
  ceil(log2 L) bits each (sorted), their values as sign + (value_bits − 1)-bit exponent code on
  the chunk's fp32 scale s = max kept |x| (2 bits: s/2 or s; 4 bits: s/128 … s), nearest level.
  Bytes: ceil(C·k·ib/8) + ceil(C·k·vb/8) + 4·C, C = ceil(n/L) chunks, ib index bits, vb value bits
  (uint8: indices, then values, then scales).

Rounding is deterministic (no stochastic rounding), so a resumed run re-sends the same bytes.
Whether a codec's payloads can be summed by an all-reduce (``summable``): none and bf16 can (the
transport sums in that dtype); int8/int4/topk cannot and travel by all-gather, then every worker
decodes each payload and sums in fp32 (`dtrain.algorithms.outer_reduce`).

`decode` validates what a peer sent (size, dtype, finite non-negative scales, indices inside the
chunk, a finite result) and raises `DecodeError`; it never produces NaN from a finite-looking payload.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

CODECS = ("none", "bf16", "int8", "int4", "topk")
MODES = ("none", "bf16", "int8")  # what NoLoCo offered before the other codecs (kept importable)


class DecodeError(ValueError):
    """A received payload decodes to something unusable (wrong size, non-finite or negative scales, NaN)."""


@dataclass(frozen=True)
class Codec:
    """One wire format; ``block`` applies to int8/int4, ``density``/``chunk``/``value_bits`` to topk."""

    name: str = "none"
    block: int = 64
    density: float = 0.03
    chunk: int = 4096
    value_bits: int = 2

    def __post_init__(self) -> None:
        if self.name not in CODECS:
            raise ValueError(f"compression must be one of {list(CODECS)}, got {self.name!r}")

    @property
    def summable(self) -> bool:
        """Payloads an all-reduce can sum (else: all-gather, then decode and sum in fp32)."""
        return self.name in ("none", "bf16")

    def wire_nbytes(self, numel: int, dtype: torch.dtype = torch.float32) -> int:
        """Bytes on the wire for one vector of ``numel`` elements of ``dtype``."""
        if self.name == "none":
            return numel * torch.empty(0, dtype=dtype).element_size()
        if self.name == "bf16":
            return 2 * numel
        if self.name == "int8":
            blocks = -(-numel // self.block)
            return blocks * self.block + 4 * blocks
        if self.name == "int4":
            blocks = -(-numel // self.block)
            return -(-blocks * self.block // 2) + 4 * blocks
        chunks, length, k, ib = self._topk_shape(numel)
        return -(-chunks * k * ib // 8) + -(-chunks * k * self.value_bits // 8) + 4 * chunks

    def encode(self, flat: torch.Tensor) -> torch.Tensor:
        """``flat`` (1-D float) as the tensor that goes on the wire."""
        if self.name == "none":
            return flat
        if self.name == "bf16":
            return flat.to(torch.bfloat16)
        if self.name == "int8":
            return _int8_encode(flat, self.block)
        if self.name == "int4":
            return _int4_encode(flat, self.block)
        return self._topk_encode(flat)

    def decode(self, wire: torch.Tensor, numel: int) -> torch.Tensor:
        """The vector a wire tensor stands for (``none``: the wire itself; else fp32). Raises
        DecodeError on a malformed payload or a non-finite result."""
        if self.name == "none":
            out = wire
        elif self.name == "bf16":
            if wire.dtype != torch.bfloat16 or wire.numel() != numel:
                raise DecodeError(f"bf16 payload of {wire.numel()} {wire.dtype} elements, expected {numel} bfloat16")
            out = wire.float()
        else:
            expected = self.wire_nbytes(numel)
            want = torch.int8 if self.name == "int8" else torch.uint8
            if wire.dtype != want or wire.numel() != expected:
                raise DecodeError(f"{self.name} payload of {wire.numel()} {wire.dtype} elements, expected {expected} {want}")
            if self.name == "int8":
                out = _int8_decode(wire, numel, self.block)
            elif self.name == "int4":
                out = _int4_decode(wire, numel, self.block)
            else:
                out = self._topk_decode(wire, numel)
        if not bool(torch.isfinite(out).all()):
            raise DecodeError("payload decodes to non-finite values")
        return out

    def roundtrip(self, flat: torch.Tensor) -> torch.Tensor:
        """decode(encode(x)), in fp32 (the codec's own value of x)."""
        return self.decode(self.encode(flat), flat.numel()).float()

    # -- top-k ---------------------------------------------------------------------------------
    def _topk_shape(self, numel: int) -> tuple[int, int, int, int]:
        """(chunks, chunk length L, kept per chunk k, index bits)."""
        length = max(1, min(self.chunk, numel))
        chunks = -(-numel // length)
        k = min(length, max(1, math.ceil(self.density * length - 1e-9)))
        return chunks, length, k, max(1, math.ceil(math.log2(length)))

    def _topk_encode(self, flat: torch.Tensor) -> torch.Tensor:
        numel = flat.numel()
        chunks, length, k, ib = self._topk_shape(numel)
        rows = _padded(flat, chunks * length).view(chunks, length)
        idx = rows.abs().topk(k, dim=1, sorted=False).indices.sort(dim=1).values
        kept = rows.gather(1, idx)
        scales = kept.abs().amax(dim=1)
        codes = _log_codes(kept, scales[:, None], self.value_bits, zero=False)
        return torch.cat([pack_bits(idx.reshape(-1), ib), pack_bits(codes.reshape(-1), self.value_bits),
                          scales.contiguous().view(torch.uint8)])

    def _topk_decode(self, wire: torch.Tensor, numel: int) -> torch.Tensor:
        chunks, length, k, ib = self._topk_shape(numel)
        n_idx, n_val = -(-chunks * k * ib // 8), -(-chunks * k * self.value_bits // 8)
        idx = unpack_bits(wire[:n_idx], chunks * k, ib).view(chunks, k)
        if bool((idx >= length).any()):
            raise DecodeError(f"topk payload has an index outside its chunk of {length}")
        codes = unpack_bits(wire[n_idx : n_idx + n_val], chunks * k, self.value_bits).view(chunks, k)
        scales = _scales(wire[n_idx + n_val :])
        values = _log_values(codes, scales[:, None], self.value_bits, zero=False)
        rows = torch.zeros(chunks, length, dtype=torch.float32, device=wire.device)
        rows.scatter_(1, idx, values)
        return rows.reshape(-1)[:numel]


def _padded(flat: torch.Tensor, size: int) -> torch.Tensor:
    out = torch.zeros(size, dtype=torch.float32, device=flat.device)
    out[: flat.numel()] = flat.reshape(-1)
    return out


def _scales(raw: torch.Tensor) -> torch.Tensor:
    scales = raw.clone().view(torch.float32)  # a copy: the scales may start at an unaligned byte offset
    if not bool(torch.isfinite(scales).all()) or bool((scales < 0).any()):
        raise DecodeError("payload has non-finite or negative scales")
    return scales


# -- sign + exponent codes (int4 and top-k values) --------------------------------------------------
def _log_codes(x: torch.Tensor, scale: torch.Tensor, bits: int, *, zero: bool) -> torch.Tensor:
    """Sign bit (top) + (bits − 1)-bit exponent code of x/scale, nearest level in linear terms.

    Levels: with ``zero`` code 0 is 0 and c ≥ 1 is 2^(c − top); without, c is 2^(c − top); top is
    the largest code. The boundary between 2^j and 2^(j+1) is 1.5·2^j; below half the smallest
    level a value is zero (``zero``) or clamped up to it."""
    top = (1 << (bits - 1)) - 1
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    m = (x.abs() / safe).clamp(max=1.0)
    lowest = 1 - top if zero else -top  # log2 of the smallest non-zero level
    j = torch.floor(torch.log2(m / 0.75)).clamp(min=lowest, max=0)
    codes = (j + top).to(torch.int64)
    if zero:
        codes = torch.where(m < 2.0 ** (lowest - 1), torch.zeros_like(codes), codes)
    return codes | ((x < 0).to(torch.int64) << (bits - 1))


def _log_values(codes: torch.Tensor, scale: torch.Tensor, bits: int, *, zero: bool) -> torch.Tensor:
    top = (1 << (bits - 1)) - 1
    mag = codes & top
    value = torch.exp2((mag - top).to(torch.float32)) * scale
    if zero:
        value = torch.where(mag == 0, torch.zeros_like(value), value)
    return torch.where((codes >> (bits - 1)) & 1 == 1, -value, value)


# -- bit packing ---------------------------------------------------------------------------------
def pack_bits(codes: torch.Tensor, width: int) -> torch.Tensor:
    """Non-negative integers < 2**width, ``width`` bits each, little-endian, into ceil(n·width/8) bytes."""
    n = codes.numel()
    if width == 4:  # the common case, without an 8× bit tensor
        c = codes.reshape(-1).to(torch.uint8)
        if n % 2:
            c = torch.cat([c, c.new_zeros(1)])
        return c[0::2] | (c[1::2] << 4)
    shifts = torch.arange(width, device=codes.device, dtype=torch.int64)
    bits = ((codes.reshape(-1, 1).to(torch.int64) >> shifts) & 1).to(torch.uint8).reshape(-1)
    bits = torch.cat([bits, bits.new_zeros((-bits.numel()) % 8)])
    weights = 1 << torch.arange(8, device=codes.device, dtype=torch.int64)
    return (bits.view(-1, 8).to(torch.int64) * weights).sum(1).to(torch.uint8)


def unpack_bits(raw: torch.Tensor, n: int, width: int) -> torch.Tensor:
    """`pack_bits`'s inverse: ``n`` int64 codes."""
    if width == 4:
        both = torch.stack([raw & 0xF, raw >> 4], dim=1).reshape(-1)
        return both[:n].to(torch.int64)
    bits = (raw.to(torch.int64)[:, None] >> torch.arange(8, device=raw.device)) & 1
    bits = bits.reshape(-1)[: n * width].view(n, width)
    return (bits << torch.arange(width, device=raw.device)).sum(1)


# -- int8 (NoLoCo's format, unchanged) and int4 -----------------------------------------------------
def _int8_encode(flat: torch.Tensor, block: int) -> torch.Tensor:
    blocks = -(-flat.numel() // block)
    rows = _padded(flat, blocks * block).view(blocks, block)
    scales = rows.abs().amax(dim=1) / 127.0
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    values = torch.round(rows / safe[:, None]).clamp_(-127, 127).to(torch.int8)
    return torch.cat([values.reshape(-1), scales.contiguous().view(torch.int8)])


def _int8_decode(wire: torch.Tensor, numel: int, block: int) -> torch.Tensor:
    blocks = -(-numel // block)
    values = wire[: blocks * block].view(blocks, block).float()
    scales = _scales(wire[blocks * block :])
    return (values * scales[:, None]).reshape(-1)[:numel]


def _int4_encode(flat: torch.Tensor, block: int) -> torch.Tensor:
    blocks = -(-flat.numel() // block)
    rows = _padded(flat, blocks * block).view(blocks, block)
    scales = rows.abs().amax(dim=1)
    codes = _log_codes(rows, scales[:, None], 4, zero=True)
    return torch.cat([pack_bits(codes.reshape(-1), 4), scales.contiguous().view(torch.uint8)])


def _int4_decode(wire: torch.Tensor, numel: int, block: int) -> torch.Tensor:
    blocks = -(-numel // block)
    n_codes = -(-blocks * block // 2)
    codes = unpack_bits(wire[:n_codes], blocks * block, 4).view(blocks, block)
    scales = _scales(wire[n_codes:])
    return _log_values(codes, scales[:, None], 4, zero=True).reshape(-1)[:numel]


# -- NoLoCo's original function API (kept for its callers) ------------------------------------------
def wire_numel(numel: int, mode: str, block: int) -> int:
    """Elements of the wire tensor for a flat vector of ``numel`` elements (none: numel)."""
    return numel if mode in ("none", "bf16") else Codec(mode, block=block).wire_nbytes(numel)


def encode(flat: torch.Tensor, mode: str, *, block: int = 64) -> torch.Tensor:
    return Codec(mode, block=block).encode(flat)


def decode(wire: torch.Tensor, numel: int, mode: str, *, block: int = 64) -> torch.Tensor:
    return Codec(mode, block=block).decode(wire, numel)


def relative_error(flat: torch.Tensor, mode: str, *, block: int = 64) -> float:
    """||decode(encode(x)) - x|| / ||x||: the error one trip over the wire adds (0 for none)."""
    if mode == "none":
        return 0.0
    back = Codec(mode, block=block).roundtrip(flat)
    norm = float(flat.norm())
    return float((back - flat).norm()) / norm if norm > 0 else 0.0


# -- the options an algorithm's Config carries (DiLoCo, Streaming DiLoCo, NoLoCo) -----------------
DEFAULT_BLOCK = 64
TOPK_DEFAULTS = {"topk_density": 0.03, "topk_chunk": 4096, "topk_value_bits": 2}


def codec_of(cfg: Any) -> Codec:
    """The codec a Config's ``compression``/``block_size``/``topk_*`` keys select."""
    return Codec(str(cfg.compression), block=int(cfg.block_size), density=float(cfg.topk_density),
                 chunk=int(cfg.topk_chunk), value_bits=int(cfg.topk_value_bits))


def check_compression(cfg: Any) -> None:
    """One-line ValueErrors naming the key; a key the chosen codec would ignore is refused."""
    name = cfg.compression
    if name not in CODECS:
        raise ValueError(f"algo.compression must be one of {list(CODECS)}, got {name!r}")
    if cfg.block_size < 1:
        raise ValueError(f"algo.block_size must be >= 1, got {cfg.block_size}")
    if name not in ("int8", "int4") and cfg.block_size != DEFAULT_BLOCK:
        raise ValueError(f"algo.block_size={cfg.block_size} only applies to algo.compression=int8 or int4; "
                         "set one of those or drop algo.block_size")
    if not 0 < cfg.topk_density <= 1:
        raise ValueError(f"algo.topk_density must be in (0, 1], got {cfg.topk_density}")
    if cfg.topk_chunk < 2:
        raise ValueError(f"algo.topk_chunk must be >= 2, got {cfg.topk_chunk}")
    if cfg.topk_value_bits not in (2, 4):
        raise ValueError(f"algo.topk_value_bits must be 2 or 4, got {cfg.topk_value_bits}")
    if name != "topk":
        for key, default in TOPK_DEFAULTS.items():
            if getattr(cfg, key) != default:
                raise ValueError(f"algo.{key} only applies to algo.compression=topk; set that or drop algo.{key}")
    if not 0 <= cfg.error_feedback_decay <= 1:
        raise ValueError(f"algo.error_feedback_decay must be in [0, 1], got {cfg.error_feedback_decay}")
    if cfg.error_feedback_decay != 1 and not cfg.error_feedback:
        raise ValueError("algo.error_feedback_decay only applies with algo.error_feedback=true; set that or drop "
                         "algo.error_feedback_decay")
    if cfg.error_feedback and name == "none":
        raise ValueError("algo.error_feedback=true does nothing with algo.compression=none (nothing is lost); "
                         "pick a codec (bf16, int8, int4, topk) or drop algo.error_feedback")
