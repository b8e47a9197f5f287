"""`dtrain` command line: `dtrain train [CONFIG] [key=value ...]`, `dtrain score ...`."""

from __future__ import annotations

import argparse
import sys

USAGE = """usage: dtrain train [CONFIG.yaml] [key=value ...]   train (alone, or under torchrun / accelerate launch)
       dtrain score ...                             score submissions AlgoPerf-style (dtrain score -h)
       dtrain config [CONFIG.yaml] [key=value ...]  print the merged, validated config"""


def _fail(msg: str, code: int = 2) -> int:
    print(f"dtrain: error: {msg}", file=sys.stderr)
    return code


def _split(args: list[str]) -> tuple[str | None, list[str]]:
    if args and "=" not in args[0]:
        return args[0], args[1:]
    return None, args


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "score":
        from dtrain.scoring.cli import main as score_main

        return score_main(rest)
    if command not in ("train", "config"):
        return _fail(f"unknown command {command!r}; use train, score or config")
    if rest and rest[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    from dtrain.config import ConfigError, load, to_yaml

    path, overrides = _split(rest)
    try:
        cfg = load(path, overrides)
    except ConfigError as e:
        return _fail(str(e))
    if command == "config":
        print(to_yaml(cfg), end="")
        return 0
    from dtrain.checkpoint import CheckpointError
    from dtrain.comm.base import CommError
    from dtrain.train import TrainingError, run

    try:
        summary = run(cfg)
    except (CheckpointError, TrainingError, CommError, ValueError) as e:
        return _fail(str(e).splitlines()[0] if str(e) else type(e).__name__, 1)
    except KeyboardInterrupt:
        return _fail("interrupted; continue with resume=true", 130)
    if summary is not None:
        ev = summary["eval"]
        print(
            f"done: {summary['algorithm']} on {summary['workload']}, {summary['world_size']} workers, "
            f"{summary['steps']} steps in {summary['wall_s']:.1f}s; {ev['metric']}={ev['value']:.4f} "
            f"(target {ev['target']}, reached={summary['reached_target']}); "
            f"bytes sent/worker (max) {summary['comm']['max'].get('bytes_sent', 0):,}; summary: {cfg.out_dir}/summary.json"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
