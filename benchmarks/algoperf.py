"""How far are learning-rate-free optimizers from a calibrated NAdamW? An AlgoPerf-style study.

Mirrors Kasimbeg et al. 2025, "How far away are truly hyperparameter-free learning algorithms?"
on dtrain's laptop-sized workloads: the NAdamW baseline and AdamW (one learning rate shared by
all workloads, from the sweeps described in the workload modules), and the learning-rate-free
optimizers Prodigy, D-Adaptation Adam, DoG, Mechanic and Schedule-Free AdamW, each twice:

  *_default     the literature defaults, out of the box (no warm-up, schedule, decay or clipping)
  *_calibrated  one setting shared by all workloads, picked by ``--calibrate`` (below)

Every submission runs on every workload (digits_cnn, ctr, seq_rnn, char_lm) with ``--studies``
studies of ``--trials`` seeds through the same harness and AlgoPerf v0.6 rules as ``dtrain score``
(dtrain.scoring: median over studies of each study's fastest trial), one worker, one thread.

    python benchmarks/algoperf.py --out benchmarks/results/algoperf.json --md benchmarks/results/algoperf.md
    python benchmarks/algoperf.py --quick                 # 5 submissions x 3 small workloads x 1 trial
    python benchmarks/algoperf.py --calibrate             # the calibration sweep behind *_calibrated

Calibration: for each method, a small grid of shared settings (schedule, warm-up, weight decay,
clipping; and the lr of Schedule-Free AdamW, which is not learning-rate-free) is scored against
the NAdamW baseline on the three small workloads with one seed; char_lm is held out. The best
grid point per method is what ``configs/submissions/<method>_calibrated.yaml`` holds.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dtrain.scoring.profiles import Scores, score_submissions  # noqa: E402
from dtrain.scoring.report import format_markdown, format_table, plot_profiles, to_json, write_json  # noqa: E402
from dtrain.scoring.runner import WORKLOAD_RUNS, plan, run_study, study_table  # noqa: E402

SUBMISSIONS_DIR = ROOT / "configs" / "submissions"
BASELINE = "nadamw"
LR_FREE = ("prodigy", "dadapt_adam", "dog", "mechanic", "schedulefree_adamw")
FULL = (BASELINE, "adamw", *(f"{m}_{v}" for m in LR_FREE for v in ("default", "calibrated")))
QUICK = (BASELINE, "adamw", "prodigy_default", "prodigy_calibrated", "schedulefree_adamw_calibrated")
SMALL_WORKLOADS = ("digits_cnn", "ctr", "seq_rnn")
ALL_WORKLOADS = (*SMALL_WORKLOADS, "char_lm")

# The calibration grid: what every method may vary, shared by all workloads. "warmup" is a
# fraction of each workload's step budget, turned into optim.warmup_steps per workload.
GRID = [
    {"schedule": "cosine", "warmup": 0.05, "weight_decay": 0.0, "grad_clip": 1.0},
    {"schedule": "cosine", "warmup": 0.05, "weight_decay": 0.1, "grad_clip": 1.0},
    {"schedule": "constant", "warmup": 0.05, "weight_decay": 0.1, "grad_clip": 1.0},
]
LR_GRID = {"schedulefree_adamw": [0.0025, 0.01], "default": [1.0]}
# (the warm-up of 5% is the harness's per-workload default, so a grid point need not set it)


def closest_to_baseline(scores: Scores) -> tuple[str, str] | None:
    """(method, submission) of the learning-rate-free submission with the best score.

    Ties are broken by the number of workloads reached, then by the mean ratio over those.
    """
    def key(s: str) -> tuple[float, int, float]:
        rs = [r for r in scores.ratios[s].values() if math.isfinite(r)]
        return (scores.scores[s], len(rs), -(sum(rs) / len(rs)) if rs else -math.inf)

    cands = [s for s in scores.scores if any(s.startswith(m + "_") for m in LR_FREE)]
    if not cands:
        return None
    best = max(cands, key=key)
    return next(m for m in LR_FREE if best.startswith(m + "_")), best


def summary_lines(scores: Scores) -> list[str]:
    lines = []
    base = scores.scores.get(BASELINE)
    found = closest_to_baseline(scores)
    if found is not None:
        method, sub = found
        vs = f" vs the NAdamW baseline's {base:.3f}" if base is not None else ""
        lines.append(f"Closest learning-rate-free method to the baseline: {method} ({sub}, score {scores.scores[sub]:.3f}{vs}).")
    for m in LR_FREE:
        got = {v: scores.scores.get(f"{m}_{v}") for v in ("default", "calibrated")}
        if all(x is not None for x in got.values()):
            lines.append(f"  {m}: default {got['default']:.3f} -> calibrated {got['calibrated']:.3f}")
    return lines


def steps_to_target(out_dir: str) -> float:
    """Diagnostic, not the score: the first evaluated step at which the trial met its target.

    Read from metrics.jsonl (the same loop logs it for everyone). Unlike wall-clock time it does
    not move when other jobs load the machine, but it ignores each optimizer's cost per step.
    """
    run = Path(out_dir)
    try:
        summary = json.loads((run / "summary.json").read_text())
        ev = summary["eval"]
        target, higher = float(ev["target"]), bool(ev["higher_is_better"])
        lines = (run / "metrics.jsonl").read_text().splitlines()
    except (OSError, KeyError, TypeError, ValueError):
        return math.inf
    for line in lines:
        rec = json.loads(line) if line.strip() else {}
        value = rec.get("eval")
        if value is not None and rec.get("step", 0) > 0 and (value >= target if higher else value <= target):
            return float(rec["step"])
    return math.inf


def progress(out_dir: str) -> float:
    """How far a trial got from its first evaluation towards the target: 0 = none (or worse), 1 = reached."""
    try:
        ev = json.loads((Path(out_dir) / "summary.json").read_text())["eval"]
        start, value, target = float(ev["initial"]), float(ev["value"]), float(ev["target"])
    except (OSError, KeyError, TypeError, ValueError):
        return 0.0
    if start == target:
        return 1.0
    return min(1.0, max(0.0, (start - value) / (start - target)))


def _summary_field(out_dir: str, key: str) -> float:
    try:
        return float(json.loads((Path(out_dir) / "summary.json").read_text()).get(key) or 0.0)
    except (OSError, ValueError):
        return 0.0


def failure_lines(results: list) -> list[str]:
    """One line per submission whose trials failed (crashed, diverged, rejected), with the first error."""
    errors: dict[str, tuple[int, int, str]] = {}
    for r in results:
        n, bad, first = errors.get(r.submission, (0, 0, ""))
        errors[r.submission] = (n + 1, bad + bool(r.error), first or (r.error or ""))
    return [f"  {s}: {bad} of {n} trials failed ({first[:120]})" for s, (n, bad, first) in errors.items() if bad]


def _write_grid(out: Path) -> list[Path]:
    """One YAML per (method, grid point); warm-up is written per workload by the caller's overrides."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [SUBMISSIONS_DIR / f"{BASELINE}.yaml"]
    for m in LR_FREE:
        for i, point in enumerate(GRID):
            for j, lr in enumerate(LR_GRID.get(m, LR_GRID["default"])):
                optim = {"name": m, "lr": lr, **{k: v for k, v in point.items() if k != "warmup"}}
                path = out / f"{m}_g{i}{'abcd'[j]}.yaml"
                OmegaConf.save(OmegaConf.create({"optim": optim}), path)
                paths.append(path)
    return paths


def calibrate(args: argparse.Namespace) -> int:
    root = Path(args.root) / "calibration"
    subs = _write_grid(root / "candidates")
    workloads = list(SMALL_WORKLOADS)
    trials = plan(subs, workloads, trials=1, root=root / "trials")
    print(f"calibration: {len(subs)} candidates x {len(workloads)} workloads = {len(trials)} trials", flush=True)
    # grid warm-up is 5% of each workload's budget: the harness's per-workload default
    results = run_study(trials, threads=1, in_process=not args.isolate, timeout_s=args.timeout,
                        echo=lambda s: print(s, flush=True))
    table = study_table(results)
    closeness: dict[str, list[float]] = {}
    for r in results:
        closeness.setdefault(r.submission, []).append(progress(r.out_dir))
    best: dict[str, tuple[float, str]] = {}
    for m in LR_FREE:
        group = {s: t for s, t in table.items() if s.startswith(m + "_g") or s == BASELINE}
        sc = score_submissions(group, workloads=workloads)
        print(f"\n{m}\n" + format_table(sc))
        # ties (often: no grid point reaches any target) go to the point that got closest to the targets
        def rank(s: str) -> tuple[float, float]:
            return sc.scores[s], sum(closeness.get(s, [0.0])) / max(1, len(closeness.get(s, [])))
        for s in sorted(group):
            if s != BASELINE:
                print(f"  {s}: score {sc.scores[s]:.3f}, mean progress to target {rank(s)[1]:.3f}")
        winner = max((s for s in sc.scores if s != BASELINE), key=rank)
        best[m] = (sc.scores[winner], winner)
    print("\nbest grid point per method (copy into configs/submissions/<method>_calibrated.yaml):")
    for m, (score, name) in best.items():
        print(f"  {m}: {name} score {score:.3f}: {OmegaConf.to_container(OmegaConf.load(root / 'candidates' / f'{name}.yaml'))}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="5 submissions x 3 small workloads x 1 trial (a few minutes)")
    p.add_argument("--calibrate", action="store_true", help="run the calibration sweep instead of the study")
    p.add_argument("--trials", type=int, default=None, help="trials (seeds) per study (default 2; quick 1)")
    p.add_argument("--studies", type=int, default=1, help="studies per submission and workload (AlgoPerf v0.6: 3)")
    p.add_argument("--workloads", default=None, help="comma-separated (default all four; quick: the three small ones)")
    p.add_argument("--root", default=str(ROOT / "runs" / "algoperf"), help="where the trials' run folders go")
    p.add_argument("--out", default=None, help="write the scores JSON here")
    p.add_argument("--md", default=None, help="write the markdown table here")
    p.add_argument("--plot", default=None, help="write profiles.png here (default ROOT/profiles.png)")
    p.add_argument("--isolate", action="store_true", help="one subprocess per trial (default: in this process)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds before a trial counts as a miss (with --isolate)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if args.calibrate:
        return calibrate(args)
    names = QUICK if args.quick else FULL
    workloads = args.workloads.split(",") if args.workloads else list(SMALL_WORKLOADS if args.quick else ALL_WORKLOADS)
    n_trials = args.trials or (1 if args.quick else 2)
    root = Path(args.root) / ("quick" if args.quick else "full")
    subs = [SUBMISSIONS_DIR / f"{n}.yaml" for n in names]
    missing = [str(s) for s in subs if not s.is_file()]
    if missing:
        print(f"algoperf: missing submission files: {', '.join(missing)}", file=sys.stderr)
        return 2
    trials = plan(subs, workloads, trials=n_trials, studies=args.studies, root=root)
    print(f"algoperf: {len(subs)} submissions x {len(workloads)} workloads x {args.studies} studies x {n_trials} trials "
          f"= {len(trials)} trials under {root}", flush=True)
    start = time.perf_counter()
    results = run_study(trials, threads=1, in_process=not args.isolate, timeout_s=args.timeout,
                        echo=lambda s: print(s, flush=True))
    scores = score_submissions(study_table(results, names=names), workloads=workloads)
    print("\n" + format_table(scores, results) + "\n")
    steps: dict[str, dict[str, dict[int, list[float]]]] = {n: {} for n in names}
    for r in results:
        steps[r.submission].setdefault(r.workload, {}).setdefault(r.study, []).append(
            steps_to_target(r.out_dir) if math.isfinite(r.time_s) else math.inf)
    steps_table = {s: {w: [st[j] for j in sorted(st)] for w, st in per_w.items()} for s, per_w in steps.items()}
    by_steps = score_submissions(steps_table, workloads=workloads)
    print("Diagnostic: the same scoring on steps to target instead of seconds (immune to machine load,\n"
          "blind to per-step cost):\n" + format_table(by_steps, unit=" steps") + "\n")
    lines = summary_lines(scores)
    failed = failure_lines(results)
    if failed:
        lines += ["Failed trials (counted as misses):", *failed]
    print("\n".join(lines))
    meta = {
        "benchmark": "algoperf", "quick": args.quick, "trials_per_study": n_trials, "studies": args.studies, "workloads_run": {w: WORKLOAD_RUNS[w] for w in workloads},
        "machine": {"cpus": torch.get_num_threads(), "cores": __import__("os").cpu_count(), "platform": platform.platform(),
                    "torch": torch.__version__},
        "study_wall_s": time.perf_counter() - start,  # this invocation (small when it only re-scored)
        "trials_wall_s": sum(_summary_field(r.out_dir, "wall_s") for r in results), "closest_lr_free": closest_to_baseline(scores), "summary": lines,
    }
    plot_profiles(args.plot or root / "profiles.png", scores, title="AlgoPerf-style profiles: NAdamW vs learning-rate-free")
    meta["step_based_scores"] = by_steps.scores
    meta["step_based_ratios"] = {s: {w: (r if math.isfinite(r) else None) for w, r in rs.items()} for s, rs in by_steps.ratios.items()}
    if args.out:
        write_json(args.out, to_json(scores, results, **meta))
        print(f"wrote {args.out}")
    if args.md:
        budgets = ", ".join(f"{w} {WORKLOAD_RUNS[w]['steps']} steps" for w in workloads)
        head = (f"AlgoPerf v0.6-rule score of each submission ({args.studies} studies x {n_trials} trials; per workload "
                f"the median over studies of each study's fastest trial; "
                f"time = training seconds to the validation target, evaluation excluded; ratio to the fastest "
                f"submission; a miss is a target not reached in the step budget or later than 4x the fastest). "
                f"One worker and one torch thread per trial on a {__import__('os').cpu_count()}-core machine "
                f"shared with other jobs, so wall-clock times carry load noise: the step-based table below is "
                f"the load-free check. Step budgets: {budgets} (char_lm scaled down: 2 layers, width 64). "
                f"The trials ran {meta['trials_wall_s'] / 60:.0f} minutes in all.\n\n")
        md = (head + format_markdown(scores, results) + "\n\n" + "\n".join(f"{ln.strip()}  " for ln in lines)
              + "\n\nDiagnostic, the same scoring on steps to target (immune to machine load, blind to per-step cost):\n\n"
              + format_markdown(by_steps, unit=" steps") + "\n")
        Path(args.md).parent.mkdir(parents=True, exist_ok=True)
        Path(args.md).write_text(md)
        print(f"wrote {args.md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
