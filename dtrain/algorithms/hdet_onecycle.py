"""The 1cycle learning-rate curve (Smith & Topin), computed exactly as torch's OneCycleLR does.

Own implementation, kept apart from the HDET scheduler so that the "exploration off" case can be
checked against torch step by step: the same phases, the same float arithmetic, the same values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Phase:
    end_step: float
    start_lr: str  # keys of the per-group values: initial_lr | max_lr | min_lr
    end_lr: str
    start_momentum: str  # max_momentum | base_momentum
    end_momentum: str


def values_per_group(name: str, value: Any, groups: list[dict[str, Any]]) -> list[Any]:
    """One value per param group: a list of that length, or one value for all (OneCycleLR's rule)."""
    if isinstance(value, (list, tuple)):
        if len(value) != len(groups):
            raise ValueError(f"{name} must have the same length as optimizer.param_groups. "
                             f"{name} has {len(value)} values, param_groups has {len(groups)}.")
        return list(value)
    return [value] * len(groups)


def resolve_total_steps(total_steps: int | None, epochs: int | None, steps_per_epoch: int | None) -> int:
    """total_steps, or epochs × steps_per_epoch (OneCycleLR's precedence and checks)."""
    if total_steps is not None:
        if not isinstance(total_steps, int) or total_steps <= 0:
            raise ValueError(f"Expected positive integer total_steps, but got {total_steps}")
        return total_steps
    if epochs is not None and steps_per_epoch is not None:
        if not isinstance(epochs, int) or epochs <= 0:
            raise ValueError(f"Expected positive integer epochs, but got {epochs}")
        if not isinstance(steps_per_epoch, int) or steps_per_epoch <= 0:
            raise ValueError(f"Expected positive integer steps_per_epoch, but got {steps_per_epoch}")
        return epochs * steps_per_epoch
    raise ValueError("You must define either total_steps OR (epochs AND steps_per_epoch)")


def build_phases(total_steps: int, pct_start: float, three_phase: bool) -> tuple[Phase, ...]:
    if not isinstance(pct_start, float) or not 0 <= pct_start <= 1:
        raise ValueError(f"Expected float between 0 and 1 pct_start, but got {pct_start}")
    warm_end = float(pct_start * total_steps) - 1
    if three_phase:
        return (
            Phase(warm_end, "initial_lr", "max_lr", "max_momentum", "base_momentum"),
            Phase(float(2 * pct_start * total_steps) - 2, "max_lr", "initial_lr", "base_momentum", "max_momentum"),
            Phase(total_steps - 1, "initial_lr", "min_lr", "max_momentum", "max_momentum"),
        )
    return (
        Phase(warm_end, "initial_lr", "max_lr", "max_momentum", "base_momentum"),
        Phase(total_steps - 1, "max_lr", "min_lr", "base_momentum", "max_momentum"),
    )


def anneal(strategy: str, start: float, end: float, pct: float) -> float:
    """From ``start`` at pct 0 to ``end`` at pct 1 (same expressions as torch, so equal bits)."""
    if strategy == "cos":
        return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)
    if strategy == "linear":
        return (end - start) * pct + start
    raise ValueError(f"anneal_strategy must be one of 'cos' or 'linear', instead got {strategy}")


def curve_point(
    step: int, phases: tuple[Phase, ...], strategy: str, values: dict[str, float], *, momentum: bool
) -> tuple[float, float | None]:
    """(lr, momentum or None) of one param group at ``step``; ``values`` holds the group's anchors."""
    start_step = 0.0
    for i, phase in enumerate(phases):
        if step <= phase.end_step or i == len(phases) - 1:
            pct = (step - start_step) / (phase.end_step - start_step)
            lr = anneal(strategy, values[phase.start_lr], values[phase.end_lr], pct)
            mom = anneal(strategy, values[phase.start_momentum], values[phase.end_momentum], pct) if momentum else None
            return lr, mom
        start_step = phase.end_step
    raise AssertionError("unreachable: the last phase always matches")


def init_groups(groups: list[dict[str, Any]], max_lr: float | list[float], *, div_factor: float, final_div_factor: float,
                cycle_momentum: bool, base_momentum: float | list[float], max_momentum: float | list[float],
                use_beta1: bool, fresh: bool) -> None:
    """Write OneCycleLR's per-group anchors (initial/max/min lr, momenta) as torch does; a resumed
    scheduler (``fresh`` False, last_epoch >= 0) finds them already in the groups."""
    max_lrs = values_per_group("max_lr", max_lr, groups)
    if fresh:
        for group, peak in zip(groups, max_lrs):
            group["initial_lr"] = peak / div_factor
            group["max_lr"] = peak
            group["min_lr"] = group["initial_lr"] / final_div_factor
    if cycle_momentum:
        tops = values_per_group("max_momentum", max_momentum, groups)
        bottoms = values_per_group("base_momentum", base_momentum, groups)
        if fresh:
            for group, top, bottom in zip(groups, tops, bottoms):
                if use_beta1:
                    group["betas"] = (top, *group["betas"][1:])
                else:
                    group["momentum"] = top
                group["max_momentum"] = top
                group["base_momentum"] = bottom
