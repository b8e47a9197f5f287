"""What a scoring study shows: the table, the JSON, and profiles.png."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dtrain.scoring.profiles import Scores
from dtrain.scoring.runner import TrialResult


def _cell(t: float, r: float, unit: str = "s") -> str:
    if not math.isfinite(t):
        return "miss"
    return f"{t:.1f}{unit} ({r:.2f})" if unit == "s" else f"{t:g}{unit} ({r:.2f})"


def workload_info(results: Sequence[TrialResult]) -> dict[str, dict[str, Any]]:
    """Per workload: metric, target and time budget, as the trials recorded them."""
    info: dict[str, dict[str, Any]] = {}
    for r in results:
        entry = info.setdefault(r.workload, {"metric": None, "target": None, "budget_s": None})
        entry["metric"] = entry["metric"] or r.metric
        entry["target"] = entry["target"] if entry["target"] is not None else r.target
        entry["budget_s"] = entry["budget_s"] if entry["budget_s"] is not None else r.budget_s
    return info


def format_table(scores: Scores, results: Sequence[TrialResult] = (), *, unit: str = "s") -> str:
    """Rows: submissions (best score first); columns: per-workload time (ratio), then the score.

    The per-workload time is the ruleset's (v0.6: median over studies of each study's fastest
    trial). A "miss" is a target never reached, reached after the budget, or reached later than 4x
    the fastest submission.
    """
    wls = scores.workloads
    subs = sorted(scores.scores, key=lambda s: (-scores.scores[s], s))
    rows = [["submission", *wls, "score"]]
    for s in subs:
        rows.append([s, *(_cell(scores.times[s][w], scores.ratios[s][w], unit) for w in wls), f"{scores.scores[s]:.3f}"])
    rows.append(["fastest", *(_cell(scores.fastest[w], 1.0, unit).split(" (")[0] for w in wls), ""])
    info = workload_info(results)
    if info:
        targets = []
        for w in wls:
            i = info.get(w, {})
            targets.append(f"{i.get('metric') or '?'} {i.get('target'):.4g}" if i.get("target") is not None else "?")
        rows.append(["target", *targets, ""])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.insert(len(subs) + 2, "  ".join("-" * w for w in widths))
    lines.append(f"({scores.ruleset} ruleset; rho over {scores.n_workloads} workloads)")
    return "\n".join(lines)


def format_markdown(scores: Scores, results: Sequence[TrialResult] = (), *, unit: str = "s") -> str:
    """The same table as GitHub markdown (time to target in seconds, ratio to the fastest)."""
    wls = scores.workloads
    subs = sorted(scores.scores, key=lambda s: (-scores.scores[s], s))
    head = "| submission | " + " | ".join(wls) + " | score |"
    out = [head, "|" + "---|" * (len(wls) + 2)]
    for s in subs:
        cells = [_cell(scores.times[s][w], scores.ratios[s][w], unit) for w in wls]
        out.append(f"| {s} | " + " | ".join(cells) + f" | {scores.scores[s]:.3f} |")
    info = workload_info(results)
    if info:
        out.append("| *target* | " + " | ".join(
            f"{info[w]['metric']} {info[w]['target']:.4g}" if w in info and info[w]["target"] is not None else "?" for w in wls
        ) + " | |")
    return "\n".join(out)


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def to_json(scores: Scores, results: Sequence[TrialResult] = (), **meta: Any) -> dict[str, Any]:
    """Everything as JSON; ``null`` stands for a miss (infinite time or ratio)."""
    return {
        **meta,
        "ruleset": scores.ruleset, "n_workloads": scores.n_workloads,
        "workloads": {w: {"fastest_s": _finite(scores.fastest[w]), **workload_info(results).get(w, {})} for w in scores.workloads},
        "submissions": {
            s: {
                "score": scores.scores[s],
                "per_workload": {
                    w: {
                        "trial_times_s": [[_finite(t) for t in study] for study in scores.trial_times[s][w]],
                        "study_best_s": [_finite(t) for t in scores.study_bests[s][w]],
                        "per_workload_s": _finite(scores.per_workload[s][w]),
                        "time_s": _finite(scores.times[s][w]),
                        "ratio": _finite(scores.ratios[s][w]),
                    }
                    for w in scores.workloads
                },
                "profile": scores.profiles[s],
            }
            for s in scores.scores
        },
        "taus": scores.taus,
        "trials": [r.as_json() for r in results],
    }


def write_json(path: str | Path, obj: dict[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, allow_nan=False))
    tmp.replace(path)


def plot_profiles(path: str | Path, scores: Scores, *, title: str = "Performance profiles") -> None:
    """rho(tau) per submission as a step plot, best score first in the legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    subs = sorted(scores.scores, key=lambda s: (-scores.scores[s], s))
    styles = ["-", "--", "-.", ":"]
    for i, s in enumerate(subs):
        ax.step(scores.taus, scores.profiles[s], where="post", linestyle=styles[(i // 10) % len(styles)],
                label=f"{s} ({scores.scores[s]:.3f})")
    ax.set_xlim(scores.taus[0], scores.taus[-1])
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("τ (time / fastest time)")
    ax.set_ylabel("ρ(τ): share of workloads within τ")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
