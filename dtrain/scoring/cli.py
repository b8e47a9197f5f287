"""`dtrain score`: run submissions x workloads x studies x trials (or read finished runs) and score them.

    dtrain score configs/submissions/ --out runs/score                     # AlgoPerf v0.6, external tuning
    dtrain score configs/submissions/ --study configs/studies/laptop.yaml  # 3 studies x 2 trials
    dtrain score configs/submissions/nadamw.yaml --workloads digits_cnn,ctr --studies 1 --trials 2
    dtrain score --runs runs/score            # score what is there, run nothing
    dtrain score --runs runs/score --best-trial   # dtrain's old rule: the fastest trial overall

The rules default to AlgoPerf v0.6 (dtrain.scoring.profiles): per workload the median over
studies of each study's fastest trial, exact 4x rule, rho over the benchmark's fixed workload
count (the study config's workloads, or --workloads).

Re-running the same command resumes: trials with a summary.json are not run again.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dtrain.scoring.profiles import RULESETS, score_submissions
from dtrain.scoring.report import format_table, plot_profiles, to_json, write_json
from dtrain.scoring.runner import WORKLOAD_RUNS, collect_results, plan, run_study, study_table
from dtrain.scoring.study import ALGOPERF_V06, StudyConfig, load_study


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dtrain score", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("submissions", nargs="*", help="submission YAML files, or folders of them (default: none; see --runs)")
    p.add_argument("--study", default=None, help="study config YAML (default: AlgoPerf v0.6 external tuning, 3 studies x 5 trials)")
    p.add_argument("--workloads", default=None, help="comma-separated workload names (default: the study config's)")
    p.add_argument("--trials", type=int, default=None, help="trials per study (default: the study config's)")
    p.add_argument("--studies", type=int, default=None, help="studies per submission and workload (default: the study config's)")
    p.add_argument("--ruleset", choices=[r for r in RULESETS if r != "best_trial"], default=None,
                   help="external or self tuning (default: the study config's)")
    p.add_argument("--best-trial", action="store_true", help="score the fastest trial overall (dtrain's old rule), not v0.6")
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
    if not subs and not args.runs:
        print("dtrain score: error: give submission YAML files (e.g. configs/submissions/) or --runs DIR", file=sys.stderr)
        return 2
    if args.jobs < 1 or args.threads < 1:
        print("dtrain score: error: --jobs and --threads must be >= 1", file=sys.stderr)
        return 2
    try:
        study = _study(args)
    except ValueError as e:
        print(f"dtrain score: error: {e}", file=sys.stderr)
        return 2
    workloads = list(study.workloads)
    out = Path(args.out)
    if subs:
        from dtrain.config import WORKLOADS

        unknown = [w for w in workloads if w not in WORKLOADS]
        if unknown:
            print(f"dtrain score: error: unknown workload {unknown[0]!r}; choose from {sorted(WORKLOADS)}", file=sys.stderr)
            return 2
        trials = plan(subs, workloads, trials=study.trials, studies=study.studies, root=out)
        print(f"scoring {len(subs)} submissions x {len(workloads)} workloads x {study.studies} studies x {study.trials} "
              f"trials = {len(trials)} trials under {out} ({study.ruleset} ruleset)", flush=True)
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
        extra = sorted({r.workload for r in results} - set(workloads))
        if extra:
            print(f"note: ignoring workloads outside the study's set {workloads}: {', '.join(extra)} (see --workloads)")
    table = study_table(results, ruleset=study.ruleset, names=names)
    scores = score_submissions(table, workloads=workloads, ruleset=study.ruleset, max_ratio=study.max_ratio)
    print()
    print(format_table(scores, results))
    json_path = Path(args.json) if args.json else out / "scores.json"
    plot_path = Path(args.plot) if args.plot else out / "profiles.png"
    write_json(json_path, to_json(scores, results, study=study.as_dict(),
                                  workload_runs={w: WORKLOAD_RUNS.get(w) for w in workloads}))
    plot_profiles(plot_path, scores)
    print(f"\nscores: {json_path}  profiles: {plot_path}")
    return 0


def _study(args: argparse.Namespace) -> StudyConfig:
    """The study config, with the command line's --ruleset/--studies/--trials/--workloads/--best-trial on top."""
    base = load_study(args.study) if args.study else ALGOPERF_V06
    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()] if args.workloads else None
    ruleset = "best_trial" if args.best_trial else args.ruleset
    if args.best_trial and args.ruleset:
        raise ValueError("--best-trial replaces the ruleset; give one of --best-trial or --ruleset")
    study = base.with_overrides(ruleset=ruleset, studies=args.studies, trials=args.trials, workloads=workloads)
    if study.ruleset == "self" and study.trials != 1 and args.trials is None and not args.study:
        study = study.with_overrides(trials=1)  # self-tuning has no tuning trials: one per study
    return study
