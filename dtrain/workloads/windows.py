"""Next-token windows of a token stream and the validation loss over them, for the language-model workloads."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn


def windows(data: torch.Tensor | np.ndarray, *, seq_len: int, batch_size: int,
            gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch_size`` windows of ``seq_len + 1`` tokens at random offsets of ``data`` (a 1-D tensor, or an
    array such as a read-only memmap), as (inputs, next tokens), int64; the offsets come from ``gen`` alone."""
    starts = torch.randint(0, len(data) - seq_len - 1, (batch_size,), generator=gen)
    idx = starts[:, None] + torch.arange(seq_len + 1)
    chunk = data[idx].long() if isinstance(data, torch.Tensor) else torch.from_numpy(data[idx.numpy()].astype(np.int64))
    return chunk[:, :-1], chunk[:, 1:]


@torch.no_grad()
def mean_loss(loss: Callable[[nn.Module, Any], torch.Tensor], model: nn.Module, data: torch.Tensor | np.ndarray, *,
              seq_len: int, batches: int, batch_size: int, gen: torch.Generator) -> float:
    """The mean of ``loss`` over ``batches`` windows of ``data``, in eval mode (the model's mode is restored)."""
    was_training = model.training
    model.eval()
    total = 0.0
    try:
        for _ in range(batches):
            total += float(loss(model, windows(data, seq_len=seq_len, batch_size=batch_size, gen=gen)))
    finally:
        model.train(was_training)
    return total / batches
