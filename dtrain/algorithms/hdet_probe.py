"""HDET's probe: each replica's loss on batches every replica shares, at its interval-mean parameters.

Why a probe: without one, replica r's loss is the mean training loss of its own batches, and in data-
parallel training every replica draws different batches, so the comparison between replicas carries
the batch-to-batch noise. A probe scores every replica on the same batches (paired comparison).

Why the interval mean: a larger lr oscillates more across steep directions; scored at its last iterate
it loses a T-step comparison that the anneal would later reverse (short-horizon bias). The mean of the
interval's iterates removes most of that oscillation, much as the anneal does.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from dtrain.algorithms.base import local, locals_


class IterateMean:
    """Running mean of a list of parameters over one converge interval (one extra copy of them).

    Checkpointed with the scheduler, so a resume mid-interval scores the same mean.
    """

    def __init__(self) -> None:
        self._mean: list[torch.Tensor] = []
        self.count = 0

    def reset(self) -> None:
        self._mean, self.count = [], 0

    def state_dict(self) -> dict:
        return {"mean": [m.clone() for m in self._mean], "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self._mean, self.count = [m.clone() for m in state["mean"]], int(state["count"])

    @torch.no_grad()
    def add(self, params: list[torch.Tensor]) -> None:
        if self.count == 0:
            self._mean = [p.detach().clone() for p in params]
        else:
            self._follow(params)
            # local shards of DTensor parameters (dtrain.hierarchy); plain tensors as they are
            torch._foreach_lerp_(locals_(self._mean), locals_([p.detach() for p in params]), 1.0 / (self.count + 1))
        self.count += 1

    @torch.no_grad()
    def score(self, params: list[torch.Tensor], probe: Callable[[int], float], index: int) -> float | None:
        """``probe(index)`` evaluated with the mean in place of ``params`` (restored after, even on error).

        Falls back to the current parameters when nothing was added. None if the loss is not finite.
        """
        swap = self.count > 0
        if swap:
            self._swap(params)
        try:
            value = float(probe(index))
        finally:
            if swap:
                self._swap(params)
        return value if math.isfinite(value) else None

    def _follow(self, params: list[torch.Tensor]) -> None:
        """A mean loaded from a checkpoint sits on the CPU: move it to the parameters' device."""
        self._mean = [m if m.device == p.device else m.to(p.device) for m, p in zip(self._mean, params)]

    def _swap(self, params: list[torch.Tensor]) -> None:
        self._follow(params)
        # Exchange storages rather than copy: no second copy of the model, and exact on the way back.
        # A sharded (DTensor) parameter keeps its storage (FSDP2 gathers from it): its shard is swapped by copies.
        for p, m in zip(params, self._mean):
            if hasattr(p, "device_mesh"):
                mine, theirs = local(p.detach()), local(m)
                keep = mine.clone()
                mine.copy_(theirs)
                theirs.copy_(keep)
            else:
                p.data, m.data = m.data, p.data
