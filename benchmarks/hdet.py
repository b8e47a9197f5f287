"""HDET as a low-communication method: learning-rate exploration over DiLoCo / NoLoCo outer steps.

One invocation, 4 workers (threads) per run, on char_lm (2 layers, d = 64; the HDET workload: no
`configs/frontier.yaml` was on main when this was written), every row over ``--seeds`` (mean ± std):

- sweeps of torch's OneCycleLR over max_lr (5 points, ×2 apart; extended past an edge while the best
  mean sits on it) with DiLoCo (outer Nesterov lr 0.7, momentum 0.9), NoLoCo (β 0.7, α 0.5, pairs) and
  DDP hooked on the optimizer; the outer step every H = 10 inner steps. The point with the lowest mean
  validation loss is each sweep's best; its runs are the reference;
- OneCycleLR + DiLoCo at the best × 10 and ÷ 10 (what a wrong max_lr costs);
- HDET over DiLoCo and over NoLoCo (``outer=diloco``/``noloco``) in its select form, from the best × 10,
  ÷ 10 and × 1, with each selection grid measured: ``odd`` (×1/10, ×1, ×1, ×10: ×1 always on it),
  ``odd, 2 rounds`` (then ×1/√10, ×1, ×1, ×√10 around the winner), ``even`` (×1/10, ×0.46, ×2.15, ×10:
  the earlier grid, without ×1);
- the paper's mechanism: replicas at ×½ … ×2 around c, converge every H steps by plain averaging, the
  scale controller moving c from probe scores (``controller, averaging``), and the same with DiLoCo's
  outer step as the converge (``controller over DiLoCo``), from the same three starts;
- the rows with gradient sync kept for comparison: HDET's select form with a gradient all-reduce every
  step after the selection, against the DDP sweep.

Compute is in worker-steps against the whole sweep's (the probe's forward passes at 1/3 of a step);
bytes are per worker (the most any worker sent), against one run of the outer algorithm at its best
max_lr. Results are cached per run in ``--cache`` (JSON lines), so an interrupted run resumes.

    nice -n 10 .venv/bin/python benchmarks/hdet.py --out benchmarks/results/hdet.json   (full: ~45 min idle)
    .venv/bin/python benchmarks/hdet.py --quick                                          (smoke, ~15 s)
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

from hdet_runs import H, ONECYCLE, WORKERS, controller_settings, mean_std, run_system, select_settings

from dtrain.workloads.char_lm import Config as CharConfig
from dtrain.workloads.char_lm import build

GRID = [4e-3, 8e-3, 1.6e-2, 3.2e-2, 6.4e-2]
MAX_EXTRA_POINTS = 1
STARTS = (("10x high", 10.0), ("10x low", 0.1), ("best lr", 1.0))
PARTS = ("diloco", "noloco", "controller", "alternatives", "noloco_forms", "extras", "ddp")
FORMS = {"odd": dict(grid="odd", rounds=1), "odd, 2 rounds": dict(grid="odd", rounds=2),
         "even": dict(grid="even", rounds=1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--quick", action="store_true", help="40 steps, a tiny model, one seed, few rows: checks that it runs")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--cache", type=Path, default=None, help="JSON lines of finished runs (default: next to --out)")
    ap.add_argument("--report-only", action="store_true", help="print the table from --cache; rows with runs missing are left out")
    ap.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS,
                    help="run only these parts (the others are read from --cache): several processes can share a cache")
    ap.add_argument("--reverse", action="store_true", help="run each group's starts in reverse order (a second process)")
    args = ap.parse_args()
    steps = 40 if args.quick else args.steps
    seeds = args.seeds[:1] if args.quick else args.seeds
    wcfg = CharConfig(n_layer=2, d_model=64, n_head=4, seq_len=64, batch_size=16, eval_batches=16, eval_batch_size=32)
    if args.quick:
        wcfg.n_layer, wcfg.d_model, wcfg.seq_len, wcfg.batch_size, wcfg.eval_batches = 1, 16, 16, 4, 1
    cache_path = args.cache or (args.out.with_suffix(".runs.jsonl") if args.out and not args.quick else None)
    cache = _load_cache(cache_path)
    workloads: dict[int, Any] = {}
    t_start = time.perf_counter()

    part = {"now": PARTS[0]}

    def go(label: str, seed: int, kind: str, lr: float, **kw: Any) -> dict[str, Any] | None:
        key = f"{label}|{seed}|{lr:.6e}"
        if key not in cache:
            cache.update(_load_cache(cache_path))  # another process sharing the cache may have run it
        if key not in cache and not args.report_only and part["now"] in args.parts:
            if seed not in workloads:
                workloads[seed] = build(wcfg, seed=seed)
            r = run_system(workloads[seed], kind=kind, max_lr=lr, steps=steps, seed=seed, **kw)
            r["label"] = label
            cache[key] = r
            if cache_path:
                with cache_path.open("a") as f:
                    f.write(json.dumps({"key": key, "row": r}, default=str) + "\n")
            print(f"  {label:<48} seed {seed} max_lr {lr:.2e}  val {r['val_loss']:.4f}  ({r['train_s']:.0f}s, "
                  f"{time.perf_counter() - t_start:.0f}s in)", flush=True)
        return cache.get(key)

    print(f"char_lm (n_layer={wcfg.n_layer}, d_model={wcfg.d_model}), {WORKERS} workers, {steps} steps, H = {H}, "
          f"seeds {seeds}", flush=True)
    grid = GRID[2:4] if args.quick else GRID
    sweeps: dict[str, list[dict[str, Any]]] = {}
    best: dict[str, dict[str, Any]] = {}
    rows: list[dict[str, Any]] = []

    def sweep(sync: str) -> bool:
        part["now"] = sync
        points = _sweep(go, sync, grid, seeds, extend=not args.quick)
        if points:
            sweeps[sync], best[sync] = points, min(points, key=lambda p: p["mean"])
            rows.append({"label": f"OneCycleLR+{_name(sync)} best of sweep", "ref": sync, "start": "best lr",
                         "max_lr": best[sync]["max_lr"], "runs": best[sync]["runs"]})
        return bool(points)

    def group(label: str, ref: str, start: str, factor: float, kind: str, **kw: Any) -> None:
        lr = best[ref]["max_lr"] * factor
        runs = [r for r in (go(label, s, kind, lr, **kw) for s in seeds) if r is not None]
        if runs:  # --report-only: a row with some seeds missing is shown with its seed count
            rows.append({"label": label, "ref": ref, "start": start, "max_lr": lr, "runs": runs})

    def select_rows(sync: str, form: str) -> None:
        for start, factor in STARTS[::-1] if args.reverse else STARTS:
            group(f"HDET over {_name(sync)}, select {form}, from {start}", sync, start, factor, "hdet",
                  hdet=select_settings(steps, outer=sync, **FORMS[form]))

    # in order of what the issue asks first, so that a run cut short has the rows that decide
    if sweep("diloco"):
        select_rows("diloco", "odd")
    if sweep("noloco"):
        select_rows("noloco", "odd")
    if not args.quick and "diloco" in best:
        part["now"] = "controller"
        for start, factor in STARTS:
            group(f"HDET controller, averaging, from {start}", "diloco", start, factor, "hdet",
                  hdet=controller_settings(steps, outer="none"))
        part["now"] = "alternatives"
        for start, factor in STARTS[::-1]:  # from the best lr first: what x1 on the grid is for
            for form in ("even", "odd, 2 rounds"):
                group(f"HDET over DiLoCo, select {form}, from {start}", "diloco", start, factor, "hdet",
                      hdet=select_settings(steps, outer="diloco", **FORMS[form]))
        part["now"] = "extras"
        for start, factor in STARTS[:2]:
            group(f"OneCycleLR+DiLoCo {start}", "diloco", start, factor, "onecycle", sync="diloco")
        for start, factor in STARTS:
            group(f"HDET controller over DiLoCo, from {start}", "diloco", start, factor, "hdet",
                  hdet=controller_settings(steps, outer="diloco"))
        if "noloco" in best:
            part["now"] = "noloco_forms"
            for form in ("even", "odd, 2 rounds"):
                select_rows("noloco", form)
        if sweep("ddp"):
            part["now"] = "ddp"
            for form in ("odd", "even"):
                for start, factor in STARTS:
                    group(f"HDET grad sync, select {form}, from {start}", "ddp", start, factor, "hdet",
                          hdet=select_settings(steps, grad_sync=True, **FORMS[form]))
    report, verdict = _report(rows, sweeps, best, seeds, steps, wcfg, time.perf_counter() - t_start)
    print("\n" + report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"steps": steps, "workers": WORKERS, "seeds": seeds, "H": H, "onecycle": ONECYCLE,
                                        "sweeps": sweeps, "rows": rows, "verdict": verdict,
                                        "select": select_settings(steps, outer="diloco"),
                                        "controller": controller_settings(steps, outer="diloco")},
                                       indent=1, default=str))
        args.out.with_suffix(".txt").write_text(report + "\n")


def _name(sync: str) -> str:
    return {"diloco": "DiLoCo", "noloco": "NoLoCo", "ddp": "DDP"}[sync]


def _sweep(go: Any, sync: str, grid: list[float], seeds: list[int], *, extend: bool) -> list[dict[str, Any]]:
    """Each max_lr of the grid over every seed; extended past an edge while the best mean sits on it."""
    points = []

    def point(lr: float) -> bool:
        runs = [go(f"OneCycleLR+{_name(sync)} sweep", s, "onecycle", lr, sync=sync) for s in seeds]
        if any(r is None for r in runs):  # --report-only with runs missing
            return False
        mean, std = mean_std([r["val_loss"] for r in runs])
        points.append({"max_lr": lr, "mean": mean, "std": std, "runs": runs})
        return True

    if not all([point(lr) for lr in grid]):
        return []
    for _ in range(MAX_EXTRA_POINTS if extend else 0):
        lrs = sorted(p["max_lr"] for p in points)
        top = min(points, key=lambda p: p["mean"])["max_lr"]
        if top not in (lrs[0], lrs[-1]):
            break
        if not point(lrs[-1] * 2 if top == lrs[-1] else lrs[0] / 2):
            break
    return sorted(points, key=lambda p: p["max_lr"])


def _report(rows: list[dict[str, Any]], sweeps: dict[str, Any], best: dict[str, Any], seeds: list[int], steps: int,
            wcfg: Any, seconds: float) -> tuple[str, list[str]]:
    head = (f"{'system':<50}{'max_lr':>9}{'seeds':>6}{'val loss':>18}{'vs sweep best':>17}{'compute':>9}"
            f"{'bytes vs ref':>14}{'MB/wkr':>9}")
    lines = [head, "-" * len(head)]
    verdict = []
    for r in rows:
        ref = best[r["ref"]]
        sweep_compute = sum(p["runs"][0]["worker_steps"] for p in sweeps[r["ref"]])
        ref_bytes = ref["runs"][0]["bytes_sent_per_worker"]
        vals = [x["val_loss"] for x in r["runs"]]
        mean, std = mean_std(vals)
        # paired: each seed against the sweep's best point run with the same seed (same init, same data)
        ref_by_seed = {x["seed"]: x["val_loss"] for x in ref["runs"]}
        gap, gap_std = mean_std([100 * (x["val_loss"] / ref_by_seed[x["seed"]] - 1) for x in r["runs"]])
        compute = r["runs"][0]["worker_steps"] / sweep_compute
        byte_ratio = max(x["bytes_sent_per_worker"] for x in r["runs"]) / ref_bytes
        r.update(mean=mean, std=std, gap=gap, gap_std=gap_std, compute=compute, bytes_ratio=byte_ratio)
        lines.append(f"{r['label']:<50}{r['max_lr']:>9.2e}{len(r['runs']):>6}{_pm(mean, std, 4):>18}{_pm(gap, gap_std, 2, '%'):>17}"
                     f"{compute:>9.3f}{byte_ratio:>14.3f}{r['runs'][0]['bytes_sent_per_worker'] / 1e6:>9.2f}")
        if r["label"].startswith("HDET over") or r["label"].startswith("HDET controller"):
            goal = 1.0 if r["start"] == "best lr" else 3.0
            ok = gap <= goal and byte_ratio <= 1.05 and compute <= 0.2 + 0.01 and len(r["runs"]) >= 3
            c = ", ".join(f"{x['scale']:.3g}" for x in r["runs"] if x.get("scale") is not None)
            verdict.append(f"{r['label']} ({len(r['runs'])} seeds): {gap:+.2f} ± {gap_std:.2f}% (goal <= +{goal:.0f}%), bytes {byte_ratio:.3f}x one "
                           f"{_name(r['ref'])} run, compute {compute:.3f} of the sweep: {'MET' if ok else 'NOT met'}; "
                           f"final c (x max_lr) per seed: {c}")
    sweep_text = "\n".join(f"{_name(s)} sweep (max_lr: val loss mean ± std over {len(seeds)} seeds): "
                           + ", ".join(f"{p['max_lr']:.1e}: {_pm(p['mean'], p['std'], 4)}" for p in pts)
                           for s, pts in sweeps.items())
    notes = (f"{steps} steps, {WORKERS} workers, char_lm n_layer={wcfg.n_layer}, d_model={wcfg.d_model}, batch "
             f"{wcfg.batch_size} per worker, seeds {seeds}; outer step every H = {H}. OneCycle: {ONECYCLE}. "
             f"vs sweep best: 100·(val/val of the sweep's best point with the same seed − 1), mean ± std over seeds; the best point is the one with the lowest mean. compute: worker-steps "
             f"/ the sweep's total; bytes vs ref: the most any worker sent / one run of the reference at its best max_lr "
             f"(DiLoCo, NoLoCo or DDP). Select form: {select_settings(steps, outer='diloco')}. Controller: "
             f"{controller_settings(steps, outer='diloco')}. Total {seconds:.0f}s.")
    return "\n".join(lines) + "\n\n" + sweep_text + "\n\n" + "\n".join(verdict) + "\n\n" + notes, verdict


def _pm(mean: float, std: float, digits: int, unit: str = "") -> str:
    if not math.isfinite(mean):
        return "diverged"
    return f"{mean:+.{digits}f}{unit} ± {std:.{digits}f}" if unit else f"{mean:.{digits}f} ± {std:.{digits}f}"


def _load_cache(path: Path | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if path and path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                item = json.loads(line)
                out[item["key"]] = item["row"]
    return out


if __name__ == "__main__":
    main()
