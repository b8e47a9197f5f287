"""HDET vs OneCycleLR + DDP on char_lm with 4 workers, one seed: the earlier table, kept runnable.

`benchmarks/hdet.py` is the benchmark now (HDET over DiLoCo / NoLoCo, 3 seeds, with the grad-sync rows
for comparison); this script reproduces the one-seed table it replaced (benchmarks/results/hdet_gradsync.txt).

Runs side by side, in one invocation, each system as 4 workers (threads, `run_local`) on the same
data stream:
- a sweep of torch's OneCycleLR over max_lr (×2 apart), each point a DDP run (gradients all-reduced
  every step). The grid is extended past an edge while the best sits on it, so the best point is
  bracketed; its validation loss is the reference;
- torch's OneCycleLR + DDP at the sweep's best max_lr × 10, ÷ 10, × 3 and ÷ 3 (the "wrong" values);
- HDET (ours) from those same wrong values and from 3x off (between the selection start's factors),
  in its select form: replicas start apart at c = x1/10, x0.46, x2.15, x10, the best by the probe at
  10% of the run is taken by all, then c x the OneCycle curve with a gradient all-reduce every step
  (``grad_sync``); and low-communication (replicas train apart, parameters averaged every T steps);
- the scale controller on its own (no selection start), with the probe and without (scored by each
  replica's own training losses), from both 10x wrong values;
- diagnostics (skip with --no-diagnostics): every form started at the sweep's best lr; the
  controller frozen there (λ = 0: what exploring alone costs); low-comm HDET at the best lr with no
  spread (what training apart costs); the sweep's best point with the next seed (how far a run's
  seed alone moves the result).

Compute is counted in worker-steps: one HDET run (4 replicas × steps, plus the probe's forward passes
at 1/3 of a step each) against the whole sweep's total. Communication is read from the Comm's own
counters (bytes and collectives per worker).

    .venv/bin/python benchmarks/hdet_gradsync.py --out benchmarks/results/hdet_gradsync.json   (6 to 25 min)
    .venv/bin/python benchmarks/hdet_gradsync.py --quick                                        (~3 min)
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

from hdet_runs import ONECYCLE, WORKERS, run_system

from dtrain.workloads.char_lm import Config as CharConfig
from dtrain.workloads.char_lm import build

GRID = [4e-3, 8e-3, 1.6e-2, 3.2e-2, 6.4e-2]  # ×2 apart; extended past an edge while the best sits on it
MAX_EXTRA_POINTS = 3


FORMS = ("select", "controller", "no probe")


def hdet_settings(steps: int, *, grad_sync: bool, form: str = "select") -> dict[str, Any]:
    """One setting per form for every wrong start (no per-case tuning).

    select (the default): replicas start apart at c = 10^u (u evenly in [-1, 1]: x1/10 ... x10), the
    best by the probe at 10% of the run is taken by all, then everyone runs c x the curve (no more
    exploring). controller: the scale controller multiplies the OneCycle curve by c, steering from
    the first converge to the end of the warm-up ramp with replicas scored by the probe (one shared
    held-out batch at their interval-mean parameters, every 5% of the run). no probe (the earlier
    form): the same, scored by their own training losses every 1/60 of the run.

    Every option these forms depend on is passed, not left to HDET's defaults (``auto_lr_alpha=None``:
    the controller forms steer from the first round, as measured, without the significance test).
    """
    every = max(2, steps // 60) if form == "no probe" else max(2, steps // 20)
    out = dict(spread=1.0, spacing="log", converge_every=every, auto_lr_warmup=every, auto_lr_mode="scale",
               auto_lr_alpha=None, auto_lr_stop=int(ONECYCLE["pct_start"] * steps), auto_lr_beta=0.5,
               auto_lr_sigma=0.03, auto_lr_gain=1.0, auto_lr_window=None, per_group=False, reshuffle=True,
               average_optimizer_state=False, grad_sync=grad_sync, probe_batches=0 if form == "no probe" else 1)
    if form == "select":  # HDET's one switch: auto_lr_mode="select" (here with its 10% and x10 spelled out)
        out.update(auto_lr_mode="select", select_steps=steps // 10, select_range=10.0, auto_lr_stop=steps // 10)
    return out


def table(rows: list[dict[str, Any]], best: float, sweep_compute: int, ddp_bytes: int) -> str:
    head = f"{'system':<42}{'max_lr':>9}{'val_loss':>10}{'vs best':>9}{'compute':>9}{'MB sent/wkr':>13}{'coll/wkr':>10}{'bytes vs DDP':>14}"
    lines = [head, "-" * len(head)]
    for r in rows:
        val = r["val_loss"]
        gap = f"{100 * (val / best - 1):+.1f}%" if math.isfinite(val) else "n/a"
        compute = f"{r['worker_steps'] / sweep_compute:.3f}"
        lines.append(f"{r['label']:<42}{r['max_lr']:>9.2e}{val:>10.4f}{gap:>9}{compute:>9}"
                     f"{r['bytes_sent_per_worker'] / 1e6:>13.2f}{r['collectives_per_worker']:>10}"
                     f"{r['bytes_sent_per_worker'] / ddp_bytes:>14.3f}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--quick", action="store_true", help="60 steps, a tiny model, 3 sweep points: checks that it runs")
    ap.add_argument("--no-diagnostics", action="store_true", help="skip the three HDET runs from the sweep's best lr")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    steps = 60 if args.quick else args.steps
    wcfg = CharConfig(n_layer=2, d_model=64, n_head=4, seq_len=64, batch_size=16, eval_batches=16, eval_batch_size=32)
    if args.quick:
        wcfg.n_layer, wcfg.d_model, wcfg.eval_batches = 1, 32, 4
    workload = build(wcfg, seed=args.seed)
    t_start = time.perf_counter()

    def go(label: str, kind: str, lr: float, hdet: dict[str, Any] | None = None, seed: int = args.seed) -> dict[str, Any]:
        wl = workload if seed == args.seed else build(wcfg, seed=seed)
        r = run_system(wl, kind=kind, max_lr=lr, steps=steps, seed=seed, hdet=hdet)
        r["label"] = label
        extra = f"  c {r['scale']:.3f} -> peak {r['peak_lr']:.2e}" if r.get("scale") is not None else ""
        print(f"  {label:<42} max_lr {lr:.2e}  val_loss {r['val_loss']:.4f}  ({r['train_s']:.0f}s){extra}", flush=True)
        return r

    def loss_of(r: dict[str, Any]) -> float:
        return r["val_loss"] if math.isfinite(r["val_loss"]) else math.inf

    print(f"char_lm (n_layer={wcfg.n_layer}, d_model={wcfg.d_model}), {WORKERS} workers, {steps} steps each", flush=True)
    grid = GRID[1:4] if args.quick else list(GRID)
    sweep = [go(f"OneCycleLR+DDP sweep {lr:.1e}", "onecycle", lr) for lr in grid]
    for _ in range(MAX_EXTRA_POINTS):  # bracket the best: extend past an edge while the best sits on it
        best = min(sweep, key=loss_of)
        lrs = sorted(r["max_lr"] for r in sweep)
        if best["max_lr"] not in (lrs[0], lrs[-1]):
            break
        lr = lrs[-1] * 2 if best["max_lr"] == lrs[-1] else lrs[0] / 2
        sweep.append(go(f"OneCycleLR+DDP sweep {lr:.1e} (extends)", "onecycle", lr))
    sweep.sort(key=lambda r: r["max_lr"])
    best = min(sweep, key=loss_of)
    best_lr = best["max_lr"]
    rows = [dict(best, label="OneCycleLR+DDP best of sweep")]
    wrong = ((10.0, "10x high"), (0.1, "10x low"), (3.0, "3x high"), (1 / 3, "3x low"))
    for factor, name in wrong:
        rows.append(go(f"OneCycleLR+DDP {name}", "onecycle", best_lr * factor))
    for factor, name in wrong:
        rows.append(go(f"HDET grad sync, select, from {name}", "hdet", best_lr * factor, hdet_settings(steps, grad_sync=True)))
    for factor, name in wrong[:2]:
        rows.append(go(f"HDET low-comm, select, from {name}", "hdet", best_lr * factor, hdet_settings(steps, grad_sync=False)))
    for form in FORMS[1:]:  # the controller alone, with and without the probe
        for factor, name in wrong[:2]:
            rows.append(go(f"HDET grad sync, {form}, from {name}", "hdet", best_lr * factor,
                           hdet_settings(steps, grad_sync=True, form=form)))
    if not args.no_diagnostics:  # why not: start HDET at the right lr
        for form in FORMS:
            rows.append(go(f"diag: HDET grad sync, {form}, from best lr", "hdet", best_lr,
                           hdet_settings(steps, grad_sync=True, form=form)))
        frozen = dict(hdet_settings(steps, grad_sync=True, form="controller"), auto_lr_gain=0.0)  # explores, c stays 1
        rows.append(go("diag: HDET grad sync, best lr, c frozen", "hdet", best_lr, frozen))
        apart = dict(hdet_settings(steps, grad_sync=False, form="controller"), spread=0.0)  # what training apart costs
        rows.append(go("diag: HDET low-comm, best lr, spread 0", "hdet", best_lr, apart))
        rows.append(go("diag: OneCycleLR+DDP best lr, next seed", "onecycle", best_lr, seed=args.seed + 1))
    sweep_compute = sum(r["worker_steps"] for r in sweep)
    ddp_bytes = best["bytes_sent_per_worker"]
    text = table(rows, best["val_loss"], sweep_compute, ddp_bytes)
    sweep_text = "sweep (max_lr: val_loss): " + ", ".join(f"{r['max_lr']:.1e}: {r['val_loss']:.4f}" for r in sweep)
    hd = [r for r in rows if r["kind"] == "hdet" and not r["label"].startswith("diag")]  # every non-diagnostic HDET row
    verdict = [f"{r['label']}: {100 * (r['val_loss'] / best['val_loss'] - 1):+.2f}% vs sweep best "
               f"({'within' if r['val_loss'] <= 1.03 * best['val_loss'] else 'NOT within'} 3%), compute "
               f"{r['worker_steps'] / sweep_compute:.3f} of the sweep, bytes {r['bytes_sent_per_worker'] / ddp_bytes:.2f}x DDP, "
               f"c = {r['scale']:.3f}: peak lr {r['peak_lr']:.2e} (sweep best {best_lr:.2e})"
               + (f"; selection scores (factors x1/10, x0.46, x2.15, x10): {', '.join('n/a' if x is None else f'{x:.3f}' for x in r['select_scores'])}"
                  if r.get("select_scores") else "") for r in hd]
    notes = (f"compute = worker-steps / the whole sweep's ({len(sweep)} points x {WORKERS} workers x {steps} steps); "
             f"bytes vs DDP = bytes sent per worker / the DDP run's. HDET select: {hdet_settings(steps, grad_sync=True)}; "
             f"controller: {hdet_settings(steps, grad_sync=True, form='controller')}; "
             f"no probe: {hdet_settings(steps, grad_sync=True, form='no probe')} (low-comm: grad_sync False; "
             f"'c frozen': auto_lr_gain 0, so the replicas explore x1/2..x2 until auto_lr_stop and the curve is never scaled). "
             f"Compute counts the probe's forward passes as 1/3 of a step each; the goal is checked on the rows of the select form. OneCycle: {ONECYCLE}. Scaled down for a shared 2-core machine: "
             f"{steps} steps, n_layer={wcfg.n_layer}, d_model={wcfg.d_model}, batch {wcfg.batch_size} per worker. "
             f"Total {time.perf_counter() - t_start:.0f}s.")
    report = text + "\n\n" + sweep_text + "\n\n" + "\n".join(verdict) + "\n\n" + notes
    print("\n" + report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"steps": steps, "workers": WORKERS, "sweep": sweep, "rows": rows,
                                        "best_sweep_lr": best_lr, "verdict": verdict, "notes": notes,
                                        "hdet": hdet_settings(steps, grad_sync=True), "onecycle": ONECYCLE},
                                       indent=1, default=str))
        args.out.with_suffix(".txt").write_text(report + "\n")


if __name__ == "__main__":
    main()
