"""Polynomial-decay iterate averaging (Shamir & Zhang, 2013), the averager DoG/LDoG rely on.

    avg_t = (1 - w_t) * avg_{t-1} + w_t * x_t,    w_t = (gamma + 1) / (gamma + t)

Matches dog-optimizer 1.0.3's PolynomialDecayAverager: parameters and floating
buffers are averaged, integer buffers (batch-norm counters) are copied.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from ._common import bad, by_device_dtype


class PolynomialDecayAverager:
    """Keeps an averaged copy of ``model``; call :meth:`step` after each optimizer step.

    Evaluate with :attr:`averaged_model`. ``gamma`` = 8 is the DoG paper's
    choice; gamma = 0 is the uniform average.
    """

    def __init__(self, model: nn.Module, *, gamma: float = 8.0, foreach: bool = True) -> None:
        if not isinstance(model, nn.Module):
            raise bad("PolynomialDecayAverager", "model", type(model).__name__,
                      "pass the torch.nn.Module being trained")
        if not isinstance(gamma, (int, float)) or isinstance(gamma, bool) or not gamma >= 0:
            raise bad("PolynomialDecayAverager", "gamma", gamma, "use a number >= 0 (8 is the DoG default)")
        self.model = model
        self.gamma = float(gamma)
        self.foreach = foreach
        self.t = 1
        self.av_model = copy.deepcopy(model)
        for p in self.av_model.parameters():
            p.requires_grad_(False)

    @property
    def averaged_model(self) -> nn.Module:
        return self.av_model

    @property
    def base_model(self) -> nn.Module:
        return self.model

    @torch.no_grad()
    def step(self) -> None:
        """Fold the model's current weights into the average."""
        src = self.model.state_dict()
        dst = self.av_model.state_dict()
        w = (self.gamma + 1) / (self.gamma + self.t)
        avg: list[Tensor] = []
        cur: list[Tensor] = []
        for key, value in src.items():
            target = dst[key]
            if target.device != value.device:
                # the model moved (e.g. .to(device) after construction): follow it
                self.av_model.to(value.device)
                return self.step()
            if not target.is_floating_point() and not target.is_complex():
                target.copy_(value)
            else:
                avg.append(target)
                cur.append(value)
        if self.foreach:
            for _, idx in by_device_dtype(len(avg), lambda i: avg[i]).items():
                torch._foreach_lerp_([avg[i] for i in idx], [cur[i] for i in idx], w)
        else:
            for a, c in zip(avg, cur):
                a.lerp_(c, w)
        self.t += 1

    def reset(self) -> None:
        """Restart the average at the next :meth:`step` (w = 1 there)."""
        self.t = 1

    def state_dict(self) -> dict[str, Any]:
        return {"t": self.t, "gamma": self.gamma, "av_model": self.av_model.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.t = int(state_dict["t"])
        self.gamma = float(state_dict.get("gamma", self.gamma))
        self.av_model.load_state_dict(state_dict["av_model"])
