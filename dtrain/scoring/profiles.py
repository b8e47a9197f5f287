"""AlgoPerf scoring math: time-to-target per trial, best trial, the 4x rule, ratios, profiles, score.

Everything here is pure (dicts of floats in, dicts of floats out) so it can be checked on small
hand-computed tables. A missed target is ``math.inf`` throughout.

    t[s][w]   best time of submission s on workload w (min over its trials; inf if none reached)
    4x rule   t[s][w] > 4 * min_s' t[s'][w]  ->  inf
    r[s][w]   t[s][w] / min_s' t[s'][w]      (inf if missed; inf for everyone if nobody reached w)
    rho_s(tau) = share of workloads with r[s][w] <= tau,  tau in linspace(1, 4, 100)
    score_s    = trapezoid area of rho_s over [1, 4] / 3, in [0, 1]
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

MAX_RATIO = 4.0
N_TAUS = 100
_TOL = 1e-9  # a ratio that lands on a grid point (up to float noise) counts as within it

Table = dict[str, dict[str, float]]  # submission -> workload -> value


def taus(*, max_ratio: float = MAX_RATIO, n: int = N_TAUS) -> list[float]:
    """numpy.linspace(1, max_ratio, n) without numpy; the last point is exactly ``max_ratio``."""
    return [1.0 + (max_ratio - 1.0) * i / (n - 1) for i in range(n)]


def trial_time(summary: Mapping[str, Any], *, budget_s: float | None = None) -> float:
    """A trial's time to target from its summary.json: training seconds (evaluation excluded).

    ``inf`` when the target was not reached, or reached only after ``budget_s`` of training.
    """
    t = summary.get("time_to_target_s")
    if t is None or not summary.get("reached_target", True):
        return math.inf
    t = float(t)
    if not math.isfinite(t) or t < 0:
        return math.inf
    if budget_s is not None and t > budget_s:
        return math.inf
    return t


def best_of_trials(trials: Mapping[str, Mapping[str, Sequence[float]]]) -> Table:
    """Per submission and workload, the fastest trial (inf if none reached or no trial ran)."""
    return {s: {w: min(ts, default=math.inf) for w, ts in per_w.items()} for s, per_w in trials.items()}


def workloads_of(times: Mapping[str, Mapping[str, float]]) -> list[str]:
    seen: dict[str, None] = {}
    for per_w in times.values():
        for w in per_w:
            seen.setdefault(w)
    return list(seen)


def fastest(times: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Per workload, the best time over all submissions (inf where nobody reached the target)."""
    return {w: min((per_w.get(w, math.inf) for per_w in times.values()), default=math.inf) for w in workloads_of(times)}


def apply_max_ratio(times: Mapping[str, Mapping[str, float]], *, max_ratio: float = MAX_RATIO) -> Table:
    """The 4x rule: a time more than ``max_ratio`` times the workload's best counts as not reached."""
    best = fastest(times)
    return {
        s: {w: (t if t <= max_ratio * best[w] * (1 + _TOL) else math.inf) for w, t in per_w.items()}
        for s, per_w in times.items()
    }


def ratios(times: Mapping[str, Mapping[str, float]]) -> Table:
    """r = t / best over submissions; inf for a miss, and for everyone on a workload nobody reached."""
    best = fastest(times)
    out: Table = {}
    for s, per_w in times.items():
        row = {}
        for w, b in best.items():
            t = per_w.get(w, math.inf)
            if not math.isfinite(t):
                row[w] = math.inf
            elif b > 0:
                row[w] = t / b
            else:  # the best time is 0 (target met before any training): only other zeros tie it
                row[w] = 1.0 if t == 0 else math.inf
        out[s] = row
    return out


def profile(submission_ratios: Iterable[float], grid: Sequence[float]) -> list[float]:
    """rho(tau): the share of workloads whose ratio is at most tau, at each tau of ``grid``."""
    rs = list(submission_ratios)
    if not rs:
        return [0.0 for _ in grid]
    return [sum(1 for r in rs if r <= tau * (1 + _TOL)) / len(rs) for tau in grid]


def trapezoid(ys: Sequence[float], xs: Sequence[float]) -> float:
    return sum((xs[i + 1] - xs[i]) * (ys[i + 1] + ys[i]) / 2 for i in range(len(xs) - 1))


def score(rho: Sequence[float], grid: Sequence[float]) -> float:
    """Area under the profile divided by the width of the tau range: 1 = fastest on every workload."""
    return trapezoid(rho, grid) / (grid[-1] - grid[0])


@dataclass
class Scores:
    """Everything the report shows; tables are submission -> workload -> value."""

    trial_times: dict[str, dict[str, list[float]]]
    best: Table  # best trial per submission and workload, before the 4x rule
    times: Table  # after the 4x rule
    fastest: dict[str, float]
    ratios: Table
    taus: list[float]
    profiles: dict[str, list[float]]
    scores: dict[str, float]
    workloads: list[str] = field(default_factory=list)


def score_submissions(
    trials: Mapping[str, Mapping[str, Sequence[float]]],
    *,
    workloads: Sequence[str] | None = None,
    max_ratio: float = MAX_RATIO,
    n_taus: int = N_TAUS,
) -> Scores:
    """From per-trial times (submission -> workload -> [seconds or inf]) to profiles and scores.

    ``workloads`` fixes the set and order of workloads (a submission with no trial on one counts
    as a miss there); by default it is every workload any submission ran.
    """
    wls = list(workloads) if workloads is not None else workloads_of(trials)
    full = {s: {w: list(per_w.get(w, [])) for w in wls} for s, per_w in trials.items()}
    best = best_of_trials(full)
    capped = apply_max_ratio(best, max_ratio=max_ratio)
    r = ratios(capped)
    grid = taus(max_ratio=max_ratio, n=n_taus)
    profs = {s: profile(r[s].values(), grid) for s in full}
    return Scores(
        trial_times=full,
        best=best,
        times=capped,
        fastest=fastest(capped),
        ratios=r,
        taus=grid,
        profiles=profs,
        scores={s: score(p, grid) for s, p in profs.items()},
        workloads=wls,
    )
