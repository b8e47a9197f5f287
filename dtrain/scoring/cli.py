"""`dtrain score`: run submissions x workloads x trials (or read finished runs) and score them.

    dtrain score configs/submissions/ --trials 2 --out runs/score
    dtrain score configs/submissions/nadamw.yaml configs/submissions/prodigy.yaml --workloads digits_cnn,ctr
    dtrain score --runs runs/score            # score what is there, run nothing

Re-running the same command resumes: trials with a summary.json are not run again.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dtrain.scoring.profiles import score_submissions
from dtrain.scoring.report import format_table, plot_profiles, to_json, write_json
from dtrain.scoring.runner import DEFAULT_WORKLOADS, WORKLOAD_RUNS, collect_results, plan, run_study


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dtrain score", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("submissions", nargs="*", help="submission YAML files, or folders of them (default: none; see --runs)")
    p.add_argument("--workloads", default=",".join(DEFAULT_WORKLOADS), help="comma-separated workload names")
    p.add_argument("--trials", type=int, default=2, help="trials (seeds) per submission and workload")
    p.add_argument("--out", default="runs/score", help="study folder: one sub-folder per trial, scores.json, profiles.png")
    p.add_argument("--runs", default=None, help="score the summary.json files under this folder instead of running")
    p.add_argument("--jobs", type=int, default=1, help="trials run at once (each in its own process)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per trial")
    p.add_argument("--in-process", action="store_true", help="run trials in this process (no isolation; for tests)")
    p.add_argument("--timeout", type=float, default=None, help="seconds before a trial is stopped and counted as a miss")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override for every trial, e.g. --set workload.batch_size=64 (repeatable)")
    p.add_argument("--json", default=None, help="where to write the scores JSON (default OUT/scores.json)")
    p.add_argument("--plot", default=None, help="where to write the profiles plot (default OUT/profiles.png)")
    return p


def expand_submissions(items: list[str]) -> list[Path]:
    """Files as given; a folder contributes its *.yaml / *.yml files in name order."""
    out: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            out.extend(sorted([*path.glob("*.yaml"), *path.glob("*.yml")]))
        elif path.is_file():
            out.append(path)
        else:
            raise ValueError(f"submission {item} is neither a YAML file nor a folder of them")
    names = [p.stem for p in out]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"two submissions share the name {dupes[0]!r}; rename one of the files")
    return out


def main(argv: list[str]) -> int:
    """Entry point of `dtrain score`; returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        subs = expand_submissions(args.submissions)
    except ValueError as e:
        print(f"dtrain score: error: {e}", file=sys.stderr)
        return 2
    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    if not subs and not args.runs:
        print("dtrain score: error: give submission YAML files (e.g. configs/submissions/) or --runs DIR", file=sys.stderr)
        return 2
    if args.trials < 1 or args.jobs < 1 or args.threads < 1:
        print("dtrain score: error: --trials, --jobs and --threads must be >= 1", file=sys.stderr)
        return 2
    out = Path(args.out)
    if subs:
        from dtrain.config import WORKLOADS

        unknown = [w for w in workloads if w not in WORKLOADS]
        if unknown:
            print(f"dtrain score: error: unknown workload {unknown[0]!r}; choose from {sorted(WORKLOADS)}", file=sys.stderr)
            return 2
        trials = plan(subs, workloads, trials=args.trials, root=out)
        print(f"scoring {len(subs)} submissions x {len(workloads)} workloads x {args.trials} trials "
              f"= {len(trials)} trials under {out}", flush=True)
        try:
            results = run_study(trials, threads=args.threads, jobs=args.jobs, in_process=args.in_process,
                                timeout_s=args.timeout, run_overrides=args.sets,
                                echo=lambda line: print(line, flush=True))
        except KeyboardInterrupt:
            print("interrupted; run the same command again to resume", file=sys.stderr)
            return 130
        names = [p.stem for p in subs]
    else:
        out = Path(args.runs)
        results = collect_results(out)
        if not results:
            print(f"dtrain score: error: no summary.json under {out}", file=sys.stderr)
            return 2
        names = sorted({r.submission for r in results})
        workloads = [w for w in dict.fromkeys(r.workload for r in results)]
    table: dict[str, dict[str, list[float]]] = {n: {} for n in names}
    for r in results:
        table.setdefault(r.submission, {}).setdefault(r.workload, []).append(r.time_s)
    scores = score_submissions(table, workloads=workloads)
    print()
    print(format_table(scores, results))
    json_path = Path(args.json) if args.json else out / "scores.json"
    plot_path = Path(args.plot) if args.plot else out / "profiles.png"
    write_json(json_path, to_json(scores, results, workload_runs={w: WORKLOAD_RUNS.get(w) for w in workloads}))
    plot_profiles(plot_path, scores)
    print(f"\nscores: {json_path}  profiles: {plot_path}")
    return 0
