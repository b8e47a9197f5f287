"""The quality-communication frontier: final validation loss against bytes sent per worker, for DDP and
the low-communication methods on configs/frontier.yaml (char_lm), at equal tokens per worker, in two
regimes that run side by side (one run at a time each):

  main   the papers' regime: the config's per-worker batch (64 x 64 bytes, where quadrupling it buys
         less than at 16 x 64; benchmarks/batch_curve.py), --steps steps, the points of --main-points
         (method:H:seeds) at the papers' hyperparameters (inner AdamW 3e-3; DiLoCo outer 0.7 / 0.9
         Nesterov; NoLoCo 0.7 / 0.5, gamma = outer lr). This machine cannot afford a sweep at this batch.
  small  the small per-worker batch of the other configs (--small-batch sequences): first a sweep of the
         same size for every method (a coordinate search on --sweep-steps steps at H=--sweep-h: inner lr
         x0.5/x1/x2 around 3e-3, then outer lr {0.5, 0.7, 1.0}, then outer momentum, DiLoCo {0.3, 0.6,
         0.9}, NoLoCo {0.3, 0.5, 0.7}; a winner at a grid's edge extends it, twice at most; int8 forms
         take their base method's values), then the points of --small-points at the winners.

Every run is `dtrain train configs/frontier.yaml` (comm.name=local: N worker threads, one torch thread
each) with only algo.*, optim.lr, seed, steps and batch changed; bytes are the comm's own counters
(summary.json, mean over workers); the loss is the mean over workers of their final validation loss.
Results are cached under --cache by run, so a killed benchmark resumes. --check-torchrun METHOD:H reruns
one main-regime point under torchrun (gloo processes) beside its local-backend twin.

    python benchmarks/frontier.py [--quick] [--out benchmarks/results/frontier.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from common import table, write_outputs
from frontier_plot import plot_curves, plot_frontier
from frontier_runs import DEFAULT_HP, Method, Run, Runner, at_step, seed_stats

QUICK_MODEL = ("workload.n_layer=1", "workload.d_model=32", "workload.n_head=2", "workload.seq_len=32",
               "workload.eval_batches=2", "workload.eval_batch_size=8", "optim.warmup_steps=4")
# The main regime's points (compute-bounded, see README): DDP and the candidates for >= 100x fewer bytes,
# int4 DiLoCo at H=30 (50 outer steps at 107x) and DiLoCo at H=100 (15 at 100x); two seeds where the goal is decided.
MAIN_POINTS = ["ddp:-:0,1", "diloco_int4:30:0,1", "diloco:100:0", "diloco:30:0"]
# The second regime: whole lines over H, two seeds where NoLoCo meets DiLoCo at H=100.
SMALL_POINTS = ["ddp:-:0", "diloco:100:0", "noloco:100:0", "noloco_int8:100:0", "diloco:30:0", "noloco:30:0", "diloco:300:0",
                "noloco:300:0", "ddp:-:1", "diloco:100:1", "noloco:100:1", "noloco_int8:300:0", "diloco:10:0", "noloco:10:0"]
GRIDS = {"outer_lr": [0.5, 0.7, 1.0], "outer_momentum": {"diloco": [0.3, 0.6, 0.9], "noloco": [0.3, 0.5, 0.7]}}


def _extend(axis: str, values: list[float], low_edge: bool) -> float | None:
    """The next grid point beyond an edge, or None when the axis has no room there."""
    if axis == "lr":
        return values[0] / 2 if low_edge else values[-1] * 2
    step = values[1] - values[0]
    v = round(values[0] - step if low_edge else values[-1] + step, 4)
    if axis == "outer_momentum":
        return v if 0 <= v < 1 else None
    return v if v > 0 else None


def sweep(runner: Runner, name: str, base: dict[str, Any], *, quick: bool) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Coordinate search for ``name``: the winning hyperparameters and every trial."""
    method = runner.table[name]
    hp = dict(DEFAULT_HP[name])
    axes: list[tuple[str, list[float]]] = [("lr", [hp["lr"] / 2, hp["lr"], hp["lr"] * 2])]
    if method.outer:
        axes += [("outer_lr", list(GRIDS["outer_lr"])), ("outer_momentum", list(GRIDS["outer_momentum"][name]))]
    if quick:
        axes = [(axis, values[1:]) for axis, values in axes[:1]]
    trials = []
    for axis, values in axes:
        for _ in range(3):  # the grid, then at most two extensions
            runs = [Run(name, base["h"] if method.outer else None, tuple(sorted({**hp, axis: v}.items())), **base["run"])
                    for v in values]
            got = runner.many(runs)
            if any(g is None for g in got):  # --from-cache and this grid has not finished
                return hp, trials
            losses = [g["val_loss"] for g in got]
            trials += [{"method": name, "axis": axis, **dict(r.hp), "val_loss": g["val_loss"]} for r, g in zip(runs, got)]
            best = min(range(len(values)), key=losses.__getitem__)
            edge = best in (0, len(values) - 1) and len(values) > 1 and not quick
            nxt = _extend(axis, values, best == 0) if edge else None
            if nxt is None:
                break
            values = [nxt, *values] if best == 0 else [*values, nxt]
        hp[axis] = values[min(range(len(values)), key=lambda i: next(t["val_loss"] for t in trials
                                                                      if t["axis"] == axis and t[axis] == values[i]))]
    return hp, trials


def parse_points(specs: list[str]) -> list[tuple[str, int | None, list[int]]]:
    """``method:H:seeds`` (H ``-`` for DDP, seeds comma-separated) -> (method, H, seeds)."""
    out = []
    for spec in specs:
        method, h, seeds = spec.split(":")
        out.append((method, None if h == "-" else int(h), [int(x) for x in seeds.split(",")]))
    return out


def lane_runs(points: list[tuple[str, int | None, list[int]]], table_: dict[str, Method], hps: dict[str, dict[str, float]],
              common: dict[str, Any]) -> list[Run]:
    hp = lambda m: tuple(sorted(hps[table_[m].base or m].items()))  # noqa: E731
    return [Run(m, h, hp(m), seed=s, **common) for m, h, seeds in points if m in table_ for s in seeds]


def rows_of(results: list[tuple[str, Run, dict[str, Any]]], labels: dict[str, str]) -> list[dict[str, Any]]:
    """One table row per (regime, method, H, workers, launcher): mean ± std over seeds."""
    groups: dict[tuple, list[tuple[Run, dict[str, Any]]]] = {}
    for regime, run, res in results:
        groups.setdefault((regime, run.method, run.h, run.workers, run.launcher), []).append((run, res))
    rows = []
    for (regime, method, h, workers, launcher), items in groups.items():
        loss, std = seed_stats([r["val_loss"] for _, r in items])
        rows.append({"regime": regime, "method": method, "label": labels.get(method, method), "H": h, "workers": workers,
                     "launcher": launcher, "seeds": len(items), "val_loss": loss, "val_loss_std": std,
                     "bytes_sent_per_worker": seed_stats([r["bytes_sent_per_worker"] for _, r in items])[0],
                     "wall_s": seed_stats([r["wall_s"] for _, r in items])[0], "hp": dict(items[0][0].hp),
                     "runs": [{"seed": run.seed, **res} for run, res in items]})
    for row in rows:
        ddp = next((r for r in rows if r["method"] == "ddp" and r["regime"] == row["regime"]
                    and r["workers"] == row["workers"] and r["launcher"] == "local"), None)
        if ddp:
            row["vs_ddp"] = row["val_loss"] / ddp["val_loss"] - 1
            row["fewer_bytes"] = ddp["bytes_sent_per_worker"] / max(row["bytes_sent_per_worker"], 1)
    order = {m: i for i, m in enumerate(labels)}
    return sorted(rows, key=lambda r: (r["regime"] != "main", r["workers"], r["launcher"], order.get(r["method"], 99), r["H"] or 0))


COLUMNS = [("regime", "regime"), ("label", "method"), ("H", "H"), ("workers", "N"), ("launcher", "launch"), ("seeds", "seeds"),
           ("val_loss", "val loss"), ("val_loss_std", "± std"), ("vs_ddp", "vs DDP"), ("bytes_sent_per_worker", "bytes/worker"),
           ("fewer_bytes", "x fewer"), ("wall_s", "wall s")]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a 1x32 model, 2 workers, 40 steps, H 5/10: a smoke run (CI)")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--main-batch", type=int, default=None, help="sequences per worker, main regime (default: the config's)")
    p.add_argument("--main-points", nargs="*", default=MAIN_POINTS, help="method:H:seeds of the main regime")
    p.add_argument("--small-batch", type=int, default=16, help="sequences per worker of the second regime (0: off)")
    p.add_argument("--small-points", nargs="*", default=SMALL_POINTS)
    p.add_argument("--no-sweep", action="store_true", help="second regime at the papers' hyperparameters too")
    p.add_argument("--sweep-steps", type=int, default=400)
    p.add_argument("--sweep-h", type=int, default=20)
    p.add_argument("--parallel", type=int, default=4, help="runs at a time in each regime")
    p.add_argument("--check-torchrun", default=None, help="method:H of the main regime to rerun under torchrun")
    p.add_argument("--from-cache", action="store_true", help="tabulate the finished runs only; start none")
    p.add_argument("--partial", action="store_true", help="with --from-cache: unfinished runs too, every run cut to the "
                   "last evaluation step all of them reached (rank 0's loss and bytes at that step)")
    p.add_argument("--cache", type=Path, default=Path("runs/frontier_cache"))
    p.add_argument("--out", default=None, help="JSON; the table (.txt) and figures (.png) go beside it")
    args = p.parse_args()
    t0 = time.perf_counter()
    extra: tuple[str, ...] = ()
    if args.quick:
        args.steps, args.workers, args.sweep_steps, args.sweep_h, args.small_batch, extra = 40, 2, 20, 5, 4, QUICK_MODEL
        args.main_points = ["ddp:-:0,1", "diloco:10:0", "noloco:10:0", "noloco_int8:10:0"]
        args.small_points = ["ddp:-:0", "diloco:10:0", "noloco:10:0"]
    # The machine is shared: runs go several at a time at nice 10 (they take what others leave idle).
    runner = Runner(cache=args.cache / ("quick" if args.quick else "full"), nice=0 if args.quick else 10,
                    parallel=args.parallel, only_cached=args.from_cache, partial=args.partial, in_process=args.quick)
    table_ = runner.table
    labels = {m: table_[m].label for m in table_}
    main_common = {"workers": args.workers, "steps": args.steps, "extra": extra, "batch": args.main_batch}
    small_common = {**main_common, "batch": args.small_batch}
    hps: dict[str, dict[str, float]] = {}
    trials: list[dict[str, Any]] = []

    def small_lane() -> list[tuple[str, Run, dict[str, Any]]]:
        nonlocal trials
        if not args.small_batch:
            return []
        base = {"h": args.sweep_h, "run": {**small_common, "steps": args.sweep_steps}}
        for name in ("ddp", "diloco", "noloco"):
            hps[name], t = (dict(DEFAULT_HP[name]), []) if args.no_sweep else sweep(runner, name, base, quick=args.quick)
            trials += t
        runs = lane_runs(parse_points(args.small_points), table_, hps, small_common)
        return [("small", r, res) for r, res in zip(runs, runner.many(runs))]

    def main_lane() -> list[tuple[str, Run, dict[str, Any]]]:
        runs = lane_runs(parse_points(args.main_points), table_, DEFAULT_HP, main_common)
        out = [("main", r, res) for r, res in zip(runs, runner.many(runs))]
        if args.check_torchrun:
            m, h = args.check_torchrun.split(":")
            ref = next(r for r in runs if r.method == m and r.h == int(h) and r.seed == 0)
            tr = dataclasses.replace(ref, launcher="torchrun")
            out.append(("main", tr, runner.one(tr)))  # type: ignore[arg-type]
        return out

    with ThreadPoolExecutor(1 if runner.in_process else 2) as pool:  # the two regimes side by side (apart from smoke runs)
        lanes = [pool.submit(main_lane), pool.submit(small_lane)]
        results = [x for lane in lanes for x in lane.result() if x[2] is not None]
    text = f"Sweep (second regime, {args.sweep_steps} steps, H={args.sweep_h}, {args.workers} workers, seed 0):\n"
    text += table(trials, [("method", "method"), ("axis", "axis"), ("lr", "inner lr"), ("outer_lr", "outer lr"),
                           ("outer_momentum", "outer mom."), ("val_loss", "val loss")])
    text += "\nchosen: " + "; ".join(f"{m} {hp}" for m, hp in hps.items())
    text += "\nmain regime hyperparameters (not swept): " + "; ".join(f"{m} {hp}" for m, hp in DEFAULT_HP.items())
    cut = None
    if args.partial and results:
        cut = min(max(p["step"] for p in res["curve"]) for _, _, res in results)
        results = [(regime, run, at_step(res, cut)) for regime, run, res in results]
        text += f"\n\nPARTIAL: runs cut at step {cut} of {args.steps} (the last evaluation every run reached); rank 0's loss"
    rows = rows_of(results, labels)
    text += "\n\nFrontier (final val loss = mean over workers; mean ± std over seeds; bytes sent per worker):\n"
    text += table(rows, COLUMNS) + "\n\n" + _verdicts(rows, workers=args.workers)
    payload = {"quick": args.quick, "partial_step": cut, "steps": args.steps, "workers": args.workers, "main_batch": args.main_batch,
               "small_batch": args.small_batch, "main_hp": DEFAULT_HP,
               "sweep": {"steps": args.sweep_steps, "h": args.sweep_h, "trials": trials, "chosen": hps}, "rows": rows}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        plot_frontier(rows, Path(args.out).with_suffix(".png"), steps=args.steps, workers=args.workers)
        plot_curves(rows, Path(args.out).with_name(Path(args.out).stem + "_curves.png"), workers=args.workers)
    text += f"\n\nWall {time.perf_counter() - t0:.0f}s (cached runs are not rerun)."
    write_outputs(args.out, payload, text)
    return 0


def _verdicts(rows: list[dict[str, Any]], *, workers: int) -> str:
    main = [r for r in rows if r["regime"] == "main" and r["workers"] == workers and r["launcher"] == "local"]
    lines = []
    far = [r for r in main if r["method"] != "ddp" and r.get("fewer_bytes", 0) >= 100]
    if far:
        b = min(far, key=lambda r: r["val_loss"])
        ok = b["vs_ddp"] <= 0.03
        lines.append(f"[{'PASS' if ok else 'FAIL'}] best at >=100x fewer bytes: {b['label']} H={b['H']} "
                     f"{b['vs_ddp']:+.2%} vs DDP at {b['fewer_bytes']:.0f}x fewer bytes (goal: within 3%)")
    for h in sorted({r["H"] for r in main if r["H"]}):
        d = next((r for r in main if r["method"] == "diloco" and r["H"] == h), None)
        n = next((r for r in main if r["method"] == "noloco" and r["H"] == h), None)
        if d and n:
            rel = n["val_loss"] / d["val_loss"] - 1
            lines.append(f"[{'PASS' if rel <= 0.005 else 'FAIL'}] NoLoCo vs DiLoCo at H={h}: {rel:+.2%} (goal: <= +0.5%)")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
