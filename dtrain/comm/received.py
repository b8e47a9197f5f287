"""What arrives from peers: the errors a transfer raises, and the checks a received tensor passes."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dtrain.comm.flat import group_by_dtype, unpack


class CommError(RuntimeError):
    """A communication call failed (peer gone, transport closed)."""


class PeerTimeout(CommError):
    """A peer did not answer within the timeout; the caller may skip it for this round."""


class BadPeerData(CommError):
    """A peer sent data that failed validation (shape, dtype, non-finite, length)."""

    def __init__(self, peer: int, reason: str) -> None:
        super().__init__(f"peer {peer} sent bad data: {reason}")
        self.peer = peer
        self.reason = reason


def check_received(peer: int, got: torch.Tensor, like: torch.Tensor, *, finite: bool = True) -> None:
    """Validate a tensor that arrived from ``peer`` against the local one it must match."""
    if got.shape != like.shape:
        raise BadPeerData(peer, f"shape {tuple(got.shape)} != expected {tuple(like.shape)}")
    if got.dtype != like.dtype:
        raise BadPeerData(peer, f"dtype {got.dtype} != expected {like.dtype}")
    if finite and got.is_floating_point() and not bool(torch.isfinite(got).all()):
        raise BadPeerData(peer, "non-finite values")


def unpack_checked(peer: int, got: torch.Tensor, tensors: Sequence[torch.Tensor], *, finite: bool) -> list[torch.Tensor]:
    """`unpack` of a received buffer; a packed (mixed-dtype) one is checked per tensor, since the
    byte buffer itself says nothing about finiteness."""
    parts = unpack(got, tensors)
    if got.dtype == torch.uint8 and len(group_by_dtype(tensors)) > 1:
        for piece, like in zip(parts, tensors):
            check_received(peer, piece, like, finite=finite)
    return parts
