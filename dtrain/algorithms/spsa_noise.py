"""SPSA's directions z, regenerated chunk by chunk from seeds, and exactly reversible perturbations.

Memory: z is never materialised for the whole model, nor even for a whole parameter: a
parameter is walked in chunks of ``chunk_numel`` elements, each chunk's z drawn from that
parameter's own generator, so the extra memory is one chunk however large the embedding.

Exact restore: in float arithmetic θ + εz − 2εz + εz is not θ (about half the elements of a
float32 model move by an ulp per step, and each worker moves by its own z), so replicas would
drift apart bit by bit. With ``exact=True`` every parameter tensor is first snapped to a grid of
step h (a power of two, so that max|θ| + 10ε < 2^23·h) and the perturbation εz is rounded to the
same grid. Every sum is then an integer times h below 2^24·h: exactly representable, so each
addition is exact and the dance restores θ bit for bit. Snapping costs at most one float32 ulp of
the tensor's largest element (round to nearest, the same on every worker). z is clamped to
±10 (a Gaussian exceeds that with probability 1.5e-23) so the grid bound holds.
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Iterator, Sequence

import torch

Z_CLAMP = 10.0
DEFAULT_CHUNK = 1 << 20  # elements per chunk: 4 MB of float32 z at a time


def direction_seed(run_seed: int, step: int, worker: int, perturbation: int, param_index: int) -> int:
    """A 63-bit seed for z of (run, step, worker, perturbation, parameter); stable everywhere."""
    packed = struct.pack("<5q", run_seed, step, worker, perturbation, param_index)
    return int.from_bytes(hashlib.blake2b(packed, digest_size=8, person=b"dtrain-spsa").digest(), "little") >> 1


def direction_generator(device: torch.device, seed: int) -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


def chunks(p: torch.Tensor, chunk_numel: int) -> Iterator[torch.Tensor]:
    """Views of the flat parameter, in a fixed order (the order z is drawn in)."""
    flat = p.detach().view(-1)
    for start in range(0, flat.numel(), chunk_numel):
        yield flat[start : start + chunk_numel]


def fill_direction(buf: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    return buf.normal_(generator=gen).clamp_(-Z_CLAMP, Z_CLAMP)


def grid_step(p: torch.Tensor, eps: float, chunk_numel: int) -> float:
    """h = 2^k with max|p| + 10·eps <= 2^m·h (m mantissa bits, 23 for float32): grid sums are exact.

    For bf16/fp16 the grid is coarse (m = 7 / 10), so ε should be large against max|p|·2^-m."""
    peak = 0.0
    for c in chunks(p, chunk_numel):
        peak = max(peak, float(c.abs().max()))
    bound = peak + Z_CLAMP * eps
    if not math.isfinite(bound):
        raise FloatingPointError("a parameter holds inf/NaN; SPSA cannot perturb it exactly")
    return 2.0 ** (math.ceil(math.log2(bound)) + round(math.log2(torch.finfo(p.dtype).eps)))


def snap(p: torch.Tensor, h: float, chunk_numel: int) -> None:
    """Round p to multiples of h in place (idempotent; x/h and ·h are exact for a power of two)."""
    for c in chunks(p, chunk_numel):
        c.div_(h).round_().mul_(h)


def perturb(p: torch.Tensor, gen: torch.Generator, buf: torch.Tensor, *, eps: float, factor: float, h: float | None, chunk_numel: int) -> None:
    """p += factor·ε·z, z from ``gen`` (on the grid h when given, so the sum is exact)."""
    for c in chunks(p, chunk_numel):
        z = fill_direction(buf[: c.numel()], gen)
        if h is None:
            c.add_(z.mul_(eps), alpha=factor)
        else:
            c.add_(z.mul_(eps / h).round_().mul_(h), alpha=factor)


def apply_directions(
    p: torch.Tensor, gens: Sequence[torch.Generator], coefs: Sequence[float], buf: torch.Tensor, *, chunk_numel: int
) -> None:
    """p += Σ_j coef_j·z_j, regenerating each z_j chunk by chunk, always in the same order."""
    for c in chunks(p, chunk_numel):
        z = buf[: c.numel()]
        for gen, coef in zip(gens, coefs, strict=True):
            c.add_(fill_direction(z, gen), alpha=coef)


def full_direction(p: torch.Tensor, seed: int, *, chunk_numel: int = DEFAULT_CHUNK) -> torch.Tensor:
    """The whole z of one parameter (for tests and hand checks; SPSA itself never builds it)."""
    gen = direction_generator(p.device, seed)
    out = torch.empty(p.numel(), dtype=p.dtype, device=p.device)
    for start in range(0, out.numel(), chunk_numel):
        fill_direction(out[start : start + chunk_numel], gen)
    return out.view_as(p)


def params_digest(params: Sequence[torch.Tensor], step: int) -> bytes:
    """8-byte blake2b of every parameter's bytes and the step counter (a real hash, not a sample)."""
    h = hashlib.blake2b(digest_size=8, person=b"dtrain-spsa-rep")
    h.update(struct.pack("<q", step))
    for p in params:
        data = p.detach()
        if data.device.type != "cpu":
            data = data.cpu()
        h.update(memoryview(data.contiguous().view(-1).view(torch.uint8).numpy()))
    return h.digest()
