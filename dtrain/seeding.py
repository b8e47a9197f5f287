"""Shared seeds: numbers every worker derives alike from a tuple, without talking.

A seed is the low 63 bits of an 8-byte blake2b digest of a message, so it is the same in every
process, on every machine and under every Python (``hash()`` is salted per process; the global
RNG is shared with user code). `stream_seed` hashes ``repr(parts)``: data streams, NoLoCo's
pairing. `digest_seed` takes the message bytes for a call site whose stream is already fixed
by another encoding (LISA's ``"dtrain.lisa/{seed}/{switch}"``), so its numbers stay the same.
"""

from __future__ import annotations

import hashlib

import torch

_MASK_63 = (1 << 63) - 1


def digest_seed(message: bytes) -> int:
    """A 63-bit seed from ``message``: the low 63 bits of its 8-byte blake2b digest."""
    return int.from_bytes(hashlib.blake2b(message, digest_size=8).digest(), "little") & _MASK_63


def stream_seed(*parts: int | str) -> int:
    """A 63-bit seed from any tuple (run seed, step, rank, a stream's name, ...)."""
    return digest_seed(repr(parts).encode())


def generator(*parts: int | str, device: torch.device | str | None = None) -> torch.Generator:
    """A private ``torch.Generator`` seeded with ``stream_seed(*parts)`` (never the global RNG)."""
    g = torch.Generator() if device is None else torch.Generator(device=device)
    g.manual_seed(stream_seed(*parts))
    return g
