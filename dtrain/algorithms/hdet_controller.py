"""HDET's pieces that hold no state: the multipliers, the explored knobs, the controller's maths, checks.

See `dtrain.algorithms.hdet` for the method and its equations."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import torch

SPACINGS = ("linear", "log")
AUTO_LR_MODES = ("additive", "scale")
_KNOB = re.compile(r"^([A-Za-z_]\w*)(?:\[(\d+)\])?$")
_MOMENTUM_KNOBS = {("momentum", None), ("betas", 0)}
# The scale mode's factor stays within [1/MAX_SCALE, MAX_SCALE] of the curve: a runaway guard only.
MAX_SCALE = 1e3


def multipliers(world_size: int, spread: float, *, spacing: str = "linear") -> list[float]:
    """ρ_r for r = 0..N−1.

    linear (DESIGN): 1 + a·u_r with u_r = (r − (N−1)/2)/max((N−1)/2, 0.5): mean 1, in [1 − a, 1 + a].
    log: (1 + a)^u_r: geometric mean 1, in [1/(1 + a), 1 + a] (a may exceed 1: a = 3 spans ×¼ … ×4).
    """
    half = (world_size - 1) / 2
    units = [(r - half) / max(half, 0.5) for r in range(world_size)]
    if spacing == "log":
        return [(1.0 + spread) ** u for u in units]
    return [1.0 + spread * u for u in units]


def softmax_weights(losses: list[float | None], sigma: float) -> list[float]:
    """w = softmax((mean L − L_r)/σ) over replicas that reported a loss (others weigh 0); [] if < 2."""
    valid = [x for x in losses if x is not None]
    if len(valid) < 2:
        return []
    mean = sum(valid) / len(valid)
    scores = [(mean - x) / sigma if x is not None else -math.inf for x in losses]
    top = max(scores)
    exps = [math.exp(s - top) for s in scores]
    total = sum(exps)
    return [e / total for e in exps]


def weighted_shift(weights: list[float], values: list[float]) -> float:
    """Δ = Σ w_r x_r − mean x_r (0 without weights): where the lower losses pull the controller."""
    if not weights:
        return 0.0
    return sum(w * x for w, x in zip(weights, values)) - sum(values) / len(values)


def decay_rate(start: float, floor: float, intervals: float) -> float:
    """γ with (1 − γ)^K = floor/start: decays ``start`` onto ``floor`` in K converge steps (0 if at floor)."""
    if not (start > floor > 0) or intervals <= 0:
        return 0.0
    return 1.0 - math.exp(-math.log(start / floor) / max(intervals, 1.0))


def check_hdet_args(
    spread: float, every: int, warmup: int | None, beta: float, sigma: float, gain: float, *,
    spacing: str = "linear", mode: str = "additive", window: int | None = None, stop: int | None = None,
) -> None:
    """ValueError naming the argument to change (`hdet.validate` prefixes ``algo.``)."""
    if spacing not in SPACINGS:
        raise ValueError(f"spacing must be one of {', '.join(SPACINGS)}, got {spacing!r}")
    if mode not in AUTO_LR_MODES:
        raise ValueError(f"auto_lr_mode must be one of {', '.join(AUTO_LR_MODES)}, got {mode!r}")
    if spacing == "linear" and not 0 <= spread < 1:
        raise ValueError(f"spread must be in [0, 1) so every multiplier stays positive, got {spread} (or use spacing=log)")
    if spacing == "log" and not (0 <= spread < math.inf):
        raise ValueError(f"spread must be finite and >= 0 with spacing=log, got {spread}")
    if int(every) != every or every < 1:
        raise ValueError(f"converge_every must be an integer >= 1, got {every}")
    if warmup is not None and warmup < 0:
        raise ValueError(f"auto_lr_warmup must be >= 0, got {warmup}")
    if not 0 <= beta < 1:
        raise ValueError(f"auto_lr_beta must be in [0, 1), got {beta}")
    if sigma <= 0:
        raise ValueError(f"auto_lr_sigma must be > 0, got {sigma}")
    if gain < 0:
        raise ValueError(f"auto_lr_gain must be >= 0, got {gain}")
    if window is not None and not (int(window) == window and 1 <= window <= every):
        raise ValueError(f"auto_lr_window must be an integer in [1, converge_every={every}] or null, got {window}")
    if stop is not None and stop < 0:
        raise ValueError(f"auto_lr_stop must be >= 0 or null, got {stop}")


def check_select_args(steps: int, value_range: float, *, mode: str, total: int) -> None:
    """ValueError naming the selection-start argument to change."""
    if int(steps) != steps or not 0 <= steps < total:
        raise ValueError(f"select_steps must be an integer in [0, total_steps={total}), got {steps}")
    if steps and not value_range > 1:
        raise ValueError(f"select_range must be > 1 (replicas start at c = range^u, u in [-1, 1]), got {value_range}")
    if steps and mode != "scale":
        raise ValueError("select_steps needs auto_lr_mode='scale' (the winner's factor c scales the schedule)")


# -- explored hyperparameters -------------------------------------------------------------------
@dataclass(frozen=True)
class Knob:
    key: str
    index: int | None  # betas[1] -> ("betas", 1)

    @property
    def name(self) -> str:
        return self.key if self.index is None else f"{self.key}[{self.index}]"

    @property
    def complement(self) -> bool:
        # Betas and momentum are explored on 1 − β, the scale on which a multiplier makes sense.
        return self.key in ("betas", "momentum")

    def read(self, group: dict[str, Any]) -> float:
        value = group[self.key]
        return float(value if self.index is None else value[self.index])

    def write(self, group: dict[str, Any], value: float) -> None:
        if self.index is None:
            group[self.key] = value
        else:
            seq = list(group[self.key])
            seq[self.index] = value
            group[self.key] = type(group[self.key])(seq)

    def to_scale(self, value: float) -> float:
        return 1.0 - value if self.complement else value

    def from_scale(self, value: float) -> float:
        return 1.0 - value if self.complement else value

    def bounds(self, group: dict[str, Any]) -> tuple[float, float]:
        """Allowed range on the explore scale (the lr never goes under OneCycle's floor)."""
        if self.key == "lr":
            return group["min_lr"], math.inf
        return (1e-6, 1.0) if self.complement else (0.0, math.inf)


def parse_explore(names: list[str] | tuple[str, ...], optimizer: torch.optim.Optimizer, *, cycle_momentum: bool) -> list[Knob]:
    knobs = []
    for name in names:
        m = _KNOB.match(name)
        if not m:
            raise ValueError(f"explore entry {name!r} must be a param-group key like 'lr', 'weight_decay' or 'betas[1]'")
        knob = Knob(m.group(1), None if m.group(2) is None else int(m.group(2)))
        for group in optimizer.param_groups:
            try:
                value = knob.read(group) if knob.key != "lr" else 0.0
            except (KeyError, IndexError, TypeError):
                raise ValueError(f"explore entry {name!r} is not a scalar of the optimizer's param groups") from None
            if not math.isfinite(value):
                raise ValueError(f"explore entry {name!r} has a non-finite value {value}")
        if cycle_momentum and (knob.key, knob.index) in _MOMENTUM_KNOBS:
            raise ValueError(f"explore entry {name!r} is cycled by the schedule; set cycle_momentum=False to explore it")
        if knob in knobs:
            raise ValueError(f"explore entry {name!r} is listed twice")
        knobs.append(knob)
    return knobs
