"""loss.png: a run's training loss against steps, wall time and bytes sent, as a paper would print it.

Drawn on a bare `matplotlib.figure.Figure` (no pyplot): no global backend switch and no figure
registry, so runs in threads of one process never share plotting state.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.figure import Figure

UNITS = ("B", "kB", "MB", "GB", "TB")  # decimal, as link speeds and papers count bytes

NAMES = {"ddp": "DDP", "diloco": "DiLoCo", "noloco": "NoLoCo", "streaming": "Streaming DiLoCo",
         "streaming_noloco": "Streaming NoLoCo", "hdet": "HDET", "spsa": "SPSA", "lisa": "LISA"}


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def plot_loss(metrics_path: Path, out_path: Path | None, *, algorithm: str, workload: str, workers: int) -> Figure:
    """Draw rank 0's metrics.jsonl to ``out_path`` (None: draw only); returns the matplotlib Figure."""
    return draw_loss(read_metrics(metrics_path), out_path, algorithm=algorithm, workload=workload, workers=workers)


def title(*, algorithm: str, workload: str, workers: int) -> str:
    algo = " + ".join(NAMES.get(a.strip(), a.strip()) for a in algorithm.split("+"))
    return f"{algo} on {workload}, {workers} worker{'s' if workers != 1 else ''}"


def draw_loss(rows: list[dict[str, Any]], out_path: Path | None, *, algorithm: str, workload: str, workers: int) -> Figure:
    """Panels: loss vs step, vs wall time, and vs bytes sent on a log axis (only when bytes were sent:
    a 1-worker run has nothing to show there); hierarchical runs add the bytes sent inside a worker."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    train = [r for r in rows if r.get("loss") is not None]
    evals = [r for r in rows if r.get("eval") is not None]
    metric = next((r["metric"] for r in evals if r.get("metric")), "val_loss")
    panels = [("step", "step", "loss vs step"), ("wall_s", "wall time (s)", "loss vs wall time")]
    if any(r.get("bytes_sent", 0) > 0 for r in rows):
        panels.append(("bytes_sent", "sent by worker 0", "loss vs bytes sent"))
    if any(r.get("inner_bytes_sent", 0) > 0 for r in rows):
        panels.append(("inner_bytes_sent", "sent inside worker 0 (fast links)", "loss vs bytes inside a worker"))
    fig = Figure(figsize=(4.2 * len(panels), 3.6), layout="constrained")
    fig.suptitle(title(algorithm=algorithm, workload=workload, workers=workers))
    for ax, (key, xlabel, name) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
        log = key.endswith("bytes_sent")
        # a log axis cannot show zero: points before the first byte was sent are left out
        keep = (lambda r: r.get(key, 0) > 0) if log else (lambda r: key in r)
        tr, ev = [r for r in train if keep(r)], [r for r in evals if keep(r)]
        ax.plot([r[key] for r in tr], [r["loss"] for r in tr], lw=1, label="train loss")
        # validation markers on the loss axis when the metric is a loss; its own axis otherwise (accuracy, error)
        vax = ax if "loss" in metric else ax.twinx()
        vax.plot([r[key] for r in ev], [r["eval"] for r in ev], "o", ms=4, color="C3", label=metric.replace("_", " "))
        if vax is not ax:
            vax.set_ylabel(metric.replace("_", " "))
        ax.set_title(name)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        if log:
            # one unit per axis (the largest that the run reached), named in the label: short tick labels
            k = max((i for i in range(len(UNITS)) if max(r.get(key, 0) for r in rows) >= 1000 ** i), default=0)
            ax.set_xscale("log")
            ax.set_xlabel(f"{xlabel} ({UNITS[k]}, log scale)")
            ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos, k=k: f"{v / 1000 ** k:g}"))
            ax.xaxis.set_minor_formatter(NullFormatter())
        handles = [h for a in ([ax] if vax is ax else [ax, vax]) for h in a.get_legend_handles_labels()[0]]
        ax.legend(handles=handles, fontsize=8)
    if out_path is not None:
        fig.savefig(out_path, dpi=120)
    return fig
