"""Figures of benchmarks/frontier.py: the frontier (final loss vs bytes per worker) and the loss curves."""

from __future__ import annotations

from pathlib import Path
from typing import Any

COLORS = {"diloco": "tab:blue", "noloco": "tab:orange", "diloco_int8": "tab:cyan", "diloco_int4": "tab:brown", "noloco_int8": "tab:red",
          "streaming": "tab:green", "streaming_int4": "tab:olive", "torchft_diloco": "tab:purple"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_frontier(rows: list[dict[str, Any]], path: Path, *, steps: int, workers: int) -> None:
    """One panel per regime: a line per method through its H values, DDP as a point with a ±1 std band."""
    plt = _plt()
    regimes = [g for g in ("main", "small") if any(r["regime"] == g for r in rows)]
    fig, axes = plt.subplots(1, len(regimes), figsize=(7.5 * len(regimes), 5.2), squeeze=False)
    for ax, regime in zip(axes[0], regimes):
        mine = [r for r in rows if r["regime"] == regime and r["workers"] == workers and r["launcher"] == "local"]
        ddp = next((r for r in mine if r["method"] == "ddp"), None)
        if ddp is not None:
            std = ddp["val_loss_std"] or 0.0
            ax.axhspan(ddp["val_loss"] - std, ddp["val_loss"] + std, color="0.85", zorder=0,
                       label=f"DDP ±1 std ({ddp['seeds']} seeds)")
            ax.axhline(ddp["val_loss"] * 1.03, color="0.5", ls=":", lw=1, label="DDP + 3%")
            ax.plot([ddp["bytes_sent_per_worker"]], [ddp["val_loss"]], "k*", ms=13, label="DDP", zorder=5)
            ax.axvline(ddp["bytes_sent_per_worker"] / 100, color="0.6", ls="--", lw=1, label="100x fewer bytes than DDP")
        for method in dict.fromkeys(r["method"] for r in mine if r["method"] != "ddp"):
            pts = sorted((r for r in mine if r["method"] == method), key=lambda r: r["bytes_sent_per_worker"])
            xs, ys = [r["bytes_sent_per_worker"] for r in pts], [r["val_loss"] for r in pts]
            err = [r["val_loss_std"] or 0.0 for r in pts]
            ax.errorbar(xs, ys, yerr=err, fmt="o-", color=COLORS.get(method), label=pts[0]["label"], capsize=3, ms=5)
            for r in pts:
                ax.annotate(f"H={r['H']}", (r["bytes_sent_per_worker"], r["val_loss"]), textcoords="offset points",
                            xytext=(4, 5), fontsize=7, color=COLORS.get(method))
        ax.set_xscale("log")
        ax.set_xlabel("bytes sent per worker over the run (log scale)")
        ax.set_ylabel("final validation loss (nats/byte, mean over workers)")
        batch = mine[0]["runs"][0].get("batch_tokens") if mine else None
        what = "papers' regime: large per-worker batch" if regime == "main" else "small per-worker batch"
        ax.set_title(f"char_lm, {workers} workers, {steps} steps — {what}" + (f" ({batch} tokens)" if batch else ""), fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    fig.suptitle("Quality vs communication: final loss against bytes sent per worker", fontsize=12)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


def plot_curves(rows: list[dict[str, Any]], path: Path, *, workers: int) -> None:
    """Validation loss against step, one panel per method (seed 0 of each H), DDP in every panel."""
    plt = _plt()
    main = [r for r in rows if r["regime"] == "main" and r["workers"] == workers and r["launcher"] == "local"]
    ddp = next((r for r in main if r["method"] == "ddp"), None)
    methods = list(dict.fromkeys(r["method"] for r in main if r["method"] != "ddp"))
    if not methods:
        return
    fig, axes = plt.subplots(1, len(methods), figsize=(4.5 * len(methods), 4), squeeze=False, sharey=True)
    for ax, method in zip(axes[0], methods):
        for r in sorted((r for r in main if r["method"] == method), key=lambda r: r["H"]):
            c = r["runs"][0]["curve"]
            ax.plot([p["step"] for p in c], [p["val_loss"] for p in c], label=f"H={r['H']}")
        if ddp is not None:
            c = ddp["runs"][0]["curve"]
            ax.plot([p["step"] for p in c], [p["val_loss"] for p in c], "k--", label="DDP")
        ax.set_title(next(r["label"] for r in main if r["method"] == method))
        ax.set_xlabel("step")
        ax.set_ylim(top=min(3.0, ax.get_ylim()[1]))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("validation loss (rank 0)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
