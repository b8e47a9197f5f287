"""HDET's pieces that hold no state: the multipliers, the explored knobs, the controller's maths, checks.

See `dtrain.algorithms.hdet` for the method and its equations."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import torch

SPACINGS = ("linear", "log")
SELECT_GRIDS = ("even", "odd")
AUTO_LR_MODES = ("scale", "select", "additive")
_KNOB = re.compile(r"^([A-Za-z_]\w*)(?:\[(\d+)\])?$")
_MOMENTUM_KNOBS = {("momentum", None), ("betas", 0)}
# The scale mode's factor stays within [1/MAX_SCALE, MAX_SCALE] of the curve: a runaway guard only.
MAX_SCALE = 1e3


def multiplier_units(world_size: int) -> list[float]:
    """u_r = (r − (N−1)/2)/max((N−1)/2, 0.5): evenly in [−1, 1], the position of ρ_r in the spread."""
    half = (world_size - 1) / 2
    return [(r - half) / max(half, 0.5) for r in range(world_size)]


def multipliers(world_size: int, spread: float, *, spacing: str = "linear") -> list[float]:
    """ρ_r for r = 0..N−1.

    linear (DESIGN): 1 + a·u_r with u_r = (r − (N−1)/2)/max((N−1)/2, 0.5): mean 1, in [1 − a, 1 + a].
    log: (1 + a)^u_r: geometric mean 1, in [1/(1 + a), 1 + a] (a may exceed 1: a = 3 spans ×¼ … ×4).
    """
    units = multiplier_units(world_size)
    if spacing == "log":
        return [(1.0 + spread) ** u for u in units]
    return [1.0 + spread * u for u in units]


def selection_factors(world_size: int, range_: float, *, grid: str = "even") -> list[float]:
    """Replica r's factor c_r = range^u_r during a selection round.

    even: u evenly in [−1, 1] (4 replicas, range 10: ×1/10, ×0.46, ×2.15, ×10; ×1 is not among them).
    odd: u evenly over an odd number of points (N, or N − 1 for even N) so u = 0 is one of them, and
    the replica left over runs ×1 as well (4 replicas: ×1/10, ×1, ×1, ×10): a max_lr that is already
    right is always on the grid, and holding it can only be lost to a replica that beats it.
    """
    if grid == "even":
        return multipliers(world_size, range_ - 1.0, spacing="log")
    points = world_size if world_size % 2 else world_size - 1
    units = [-1.0 + 2.0 * i / (points - 1) for i in range(points)] if points > 1 else [0.0]
    units[points // 2 : points // 2] = [0.0] * (world_size - points)
    return [range_**u for u in units]


def round_range(range_: float, round_: int) -> float:
    """Selection round j's range: range^(1/2^j), a grid that halves (in log) around the last winner."""
    return range_ ** (0.5**round_)


def deal(keys: list[tuple[int, int]], replicas: int, *, seed: int, index: int) -> dict[tuple[int, int], list[int]]:
    """Which multiplier each replica holds, per key, in interval ``index``: the same on every replica
    (a private generator seeded by seed + index; index 0 is the identity)."""
    if index == 0:
        return {k: list(range(replicas)) for k in keys}
    gen = torch.Generator().manual_seed(seed + index)
    return {k: torch.randperm(replicas, generator=gen).tolist() for k in keys}


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


# -- the significance test that gates the controller ----------------------------------------------
# A test by betting (Ville's inequality). Each round's sign says whether the replicas with the higher
# multipliers had the higher (+1) or lower (−1) losses. Under the null that the multiplier does not
# change the loss, the sign is ±1 with equal chance: the multipliers are re-dealt to replicas by a
# fresh random permutation every round, and reversing a deal flips the sign. So the wealth
# M = mean over λ in BETS of Π_k (1 + λ·sign_k) is a martingale with M_0 = 1, and P(M ever reaches
# 1/α) ≤ α over the whole run, however many rounds are looked at: noise alone opens the gate with
# probability at most α. With α = 0.05 it takes at least 7 consistent rounds (or 10 with one contrary).
BETS = (-0.9, -0.75, -0.5, 0.5, 0.75, 0.9)


def round_sign(losses: list[float | None], units: list[float]) -> int:
    """sign of Σ_r u_r·(L_r − mean L) over the replicas that reported a loss (0: a tie or < 2 losses).

    ``units`` is each replica's position u in the spread this round (its multiplier's rank)."""
    pairs = [(x, u) for x, u in zip(losses, units) if x is not None]
    if len(pairs) < 2:
        return 0
    mean = sum(x for x, _ in pairs) / len(pairs)
    s = sum(u * (x - mean) for x, u in pairs)
    return (s > 0) - (s < 0)


def bet_wealth(signs_up: int, signs_down: int) -> float:
    """M after ``signs_up`` rounds of +1 and ``signs_down`` of −1 (the order does not matter)."""
    return sum((1 + lam) ** signs_up * (1 - lam) ** signs_down for lam in BETS) / len(BETS)


def evidence_passes(signs_up: int, signs_down: int, alpha: float | None) -> bool:
    """Whether the rounds so far reject 'the multiplier does not matter' at level ``alpha`` (None: no test)."""
    return alpha is None or bet_wealth(signs_up, signs_down) >= 1 / alpha


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


def resolve_select_steps(steps: int | None, *, mode: str, total: int, rounds: int = 1, align: int = 1) -> int:
    """The step of the selection (0: none): ``steps``, or 10% of the run in select mode; checked against the run.

    ``align`` (the outer step's period, with an outer algorithm): the selection ends on an outer-step
    boundary, so the default is rounded down to a multiple of it (at least one period)."""
    if steps is None:
        steps = max(1, total // 10) if mode == "select" else 0
        if steps and align > 1:
            steps = max(align, steps // align * align) * rounds
    if not 0 <= steps < total:
        raise ValueError(f"algo.select_steps must be an integer in [0, total_steps={total}), got {steps}")
    if steps and steps % rounds:
        raise ValueError(f"algo.select_steps={steps} must split into algo.select_rounds={rounds} rounds of whole steps")
    if steps and steps // rounds % align:
        raise ValueError(f"algo.select_steps={steps} must be a multiple of algo.converge_every={align} per round with an "
                         "outer algorithm (each selection round ends on an outer-step boundary)")
    return int(steps)


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
