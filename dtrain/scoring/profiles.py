"""AlgoPerf v0.6 scoring math: per-workload time, the 4x rule, ratios, profiles, score.

Follows mlcommons/algorithmic-efficiency ``scoring/performance_profile.py`` (with
``score_submissions.py``'s settings: tau in linspace(1, 4, 100), area normalised by 3) and the
rules in its ``docs/DOCUMENTATION.md``. Pure functions on small tables so each rule can be checked
by hand. A missed target is ``math.inf`` throughout.

    trial      t[i][j]   first time trial i of study j reached the target (inf if never / over budget)
    external   t[s][w] = median_j min_i t[i][j]   (5 trials x 3 studies; an inf study takes part in the median)
    self       t[s][w] = median_j t[j]            (3 studies of one trial each; budget x1.5, see SELF_TUNING_BUDGET)
    best_trial t[s][w] = min over every trial     (dtrain's old rule; only on request)
    4x rule    t[s][w] > 4 * min_s' t[s'][w]  ->  inf       (exact comparison, as the reference)
    r[s][w]    t[s][w] / min_s' t[s'][w]                     (IEEE division, as pandas does it)
    rho_s(tau) = #{w : r[s][w] <= tau} / n                   (n: the benchmark's fixed workload count)
    score_s    = trapezoid area of rho_s over tau in linspace(1, 4, 100), divided by 3

Edge cases, as the reference's arithmetic gives them: tied times get ratio exactly 1 (x / x);
on a workload nobody reached, every ratio is inf / inf = NaN, which is never <= tau (a miss for
all); a best time of 0 gives the submissions at 0 a ratio 0 / 0 = NaN (a miss too: a target met
before any training says the target is wrong, not that the submission is fast) and everyone else
inf. The median of an even number of studies is the mean of the middle two (numpy's median).
The reference picks, within a study, the trial whose first target-reaching evaluation has the
lowest *index* and reports its time; with per-trial times only, the fastest trial is taken.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

MAX_RATIO = 4.0
N_TAUS = 100
RULESETS = ("external", "self", "best_trial")
SELF_TUNING_BUDGET = 1.5  # self-tuning's max_runtime is 1.5x the external-tuning one

Table = dict[str, dict[str, float]]  # submission -> workload -> value
StudyTable = Mapping[str, Mapping[str, Sequence[Sequence[float]]]]  # submission -> workload -> studies -> trials


def taus(*, max_ratio: float = MAX_RATIO, n: int = N_TAUS) -> list[float]:
    """numpy.linspace(1, max_ratio, n), bit for bit: i * step + 1, the last point exactly ``max_ratio``."""
    if n < 2:
        raise ValueError(f"the tau grid needs at least 2 points, got {n}")
    step = (max_ratio - 1.0) / (n - 1)
    return [float(i) * step + 1.0 for i in range(n - 1)] + [float(max_ratio)]


def budget_factor(ruleset: str) -> float:
    """How much longer than the workload's time budget a trial may train under ``ruleset``."""
    check_ruleset(ruleset)
    return SELF_TUNING_BUDGET if ruleset == "self" else 1.0


def check_ruleset(ruleset: str) -> None:
    if ruleset not in RULESETS:
        raise ValueError(f"ruleset must be one of {', '.join(RULESETS)}, got {ruleset!r}")


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


def median(values: Sequence[float]) -> float:
    """numpy.median of finite-or-inf values: the middle one, or the mean of the middle two."""
    xs = sorted(values)
    if not xs:
        return math.inf
    mid = len(xs) // 2
    if len(xs) % 2:
        return xs[mid]
    return (xs[mid - 1] + xs[mid]) / 2  # inf if either is inf, as numpy gives


def per_workload_time(studies: Sequence[Sequence[float]], *, ruleset: str = "external") -> float:
    """One submission's time on one workload from its studies' trial times, under ``ruleset``.

    No study at all (the submission never ran the workload) is a miss.
    """
    check_ruleset(ruleset)
    if ruleset == "best_trial":
        return min((t for study in studies for t in study), default=math.inf)
    return median([min(study, default=math.inf) for study in studies])


def workloads_of(table: Mapping[str, Mapping[str, Any]]) -> list[str]:
    seen: dict[str, None] = {}
    for per_w in table.values():
        for w in per_w:
            seen.setdefault(w)
    return list(seen)


def fastest(times: Mapping[str, Mapping[str, float]], workloads: Sequence[str] | None = None) -> dict[str, float]:
    """Per workload, the best time over all submissions (inf where nobody reached the target)."""
    wls = workloads_of(times) if workloads is None else workloads
    return {w: min((per_w.get(w, math.inf) for per_w in times.values()), default=math.inf) for w in wls}


def apply_max_ratio(times: Mapping[str, Mapping[str, float]], *, max_ratio: float = MAX_RATIO) -> Table:
    """The 4x rule: a time strictly more than ``max_ratio`` times the workload's best counts as a miss."""
    best = fastest(times)
    return {s: {w: (math.inf if t > max_ratio * best[w] else t) for w, t in per_w.items()} for s, per_w in times.items()}


def _divide(t: float, best: float) -> float:
    """t / best with IEEE semantics (pandas'): 0/0 and inf/inf are NaN, x/0 is inf."""
    if best == 0:
        return math.nan if t == 0 or math.isnan(t) else math.inf
    return t / best  # inf / inf is NaN in Python too


def ratios(times: Mapping[str, Mapping[str, float]], workloads: Sequence[str] | None = None) -> Table:
    """r = t / best over submissions; inf for a miss, NaN for everyone on a workload nobody reached."""
    best = fastest(times, workloads)
    return {s: {w: _divide(per_w.get(w, math.inf), b) for w, b in best.items()} for s, per_w in times.items()}


def profile(submission_ratios: Iterable[float], grid: Sequence[float], *, n_workloads: int | None = None) -> list[float]:
    """rho(tau): the number of workloads with ratio <= tau, over ``n_workloads`` (default: the ratios given)."""
    rs = list(submission_ratios)
    n = len(rs) if n_workloads is None else n_workloads
    if n <= 0:
        return [0.0 for _ in grid]
    return [sum(1 for r in rs if r <= tau) / n for tau in grid]  # NaN <= tau is False: a miss


def trapezoid(ys: Sequence[float], xs: Sequence[float]) -> float:
    return sum((xs[i + 1] - xs[i]) * (ys[i + 1] + ys[i]) / 2.0 for i in range(len(xs) - 1))


def score(rho: Sequence[float], grid: Sequence[float]) -> float:
    """Area under the profile divided by the width of the tau range: 1 = fastest on every workload."""
    return trapezoid(rho, grid) / (max(grid) - min(grid))


@dataclass
class Scores:
    """Everything the report shows; tables are submission -> workload -> value."""

    trial_times: dict[str, dict[str, list[list[float]]]]  # per study, per trial
    study_bests: dict[str, dict[str, list[float]]]  # fastest trial of each study
    per_workload: Table  # the ruleset's per-workload time, before the 4x rule
    times: Table  # after the 4x rule
    fastest: dict[str, float]
    ratios: Table
    taus: list[float]
    profiles: dict[str, list[float]]
    scores: dict[str, float]
    workloads: list[str] = field(default_factory=list)
    n_workloads: int = 0
    ruleset: str = "external"


def score_submissions(
    trials: StudyTable,
    *,
    workloads: Sequence[str] | None = None,
    n_workloads: int | None = None,
    ruleset: str = "external",
    max_ratio: float = MAX_RATIO,
    n_taus: int = N_TAUS,
) -> Scores:
    """From per-trial times (submission -> workload -> studies -> [seconds or inf]) to scores.

    ``workloads`` is the benchmark's workload set (a submission that did not run one misses it;
    workloads outside it are ignored, as the reference keeps only its base workloads); by default
    every workload any submission ran. ``n_workloads`` is the count rho divides by: by default
    ``len(workloads)``, never less.
    """
    check_ruleset(ruleset)
    wls = list(workloads) if workloads is not None else workloads_of(trials)
    n = len(wls) if n_workloads is None else n_workloads
    if n < len(wls):
        raise ValueError(f"n_workloads={n} is less than the {len(wls)} workloads scored; raise it or drop workloads")
    full = {s: {w: [list(study) for study in per_w.get(w, [])] for w in wls} for s, per_w in trials.items()}
    bests = {s: {w: [min(st, default=math.inf) for st in studies] for w, studies in per_w.items()} for s, per_w in full.items()}
    per_wl = {s: {w: per_workload_time(st, ruleset=ruleset) for w, st in per_w.items()} for s, per_w in full.items()}
    capped = apply_max_ratio(per_wl, max_ratio=max_ratio)
    r = ratios(capped, wls)
    grid = taus(max_ratio=max_ratio, n=n_taus)
    profs = {s: profile(r[s].values(), grid, n_workloads=n) for s in full}
    return Scores(
        trial_times=full, study_bests=bests, per_workload=per_wl, times=capped, fastest=fastest(capped, wls), ratios=r,
        taus=grid, profiles=profs, scores={s: score(p, grid) for s, p in profs.items()}, workloads=wls, n_workloads=n,
        ruleset=ruleset,
    )


def single_study(trials: Mapping[str, Mapping[str, Sequence[float]]]) -> dict[str, dict[str, list[list[float]]]]:
    """submission -> workload -> [trial times] as one study per workload (for callers with no study layout)."""
    return {s: {w: [list(ts)] for w, ts in per_w.items()} for s, per_w in trials.items()}
