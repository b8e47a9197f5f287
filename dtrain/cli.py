"""`dtrain` command line: `dtrain train [CONFIG] [key=value ...]`, `dtrain score ...`."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

USAGE = """usage: dtrain train [CONFIG.yaml] [key=value ...]   train (alone, or under torchrun / accelerate launch)
       dtrain score ...                             score submissions AlgoPerf-style (dtrain score -h)
       dtrain config [CONFIG.yaml] [key=value ...]  print the merged, validated config"""


def _fail(msg: str, code: int = 2) -> int:
    from dtrain.report import stderr_line

    stderr_line(f"dtrain: error: {msg}")
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
    if any(a in ("-h", "--help") for a in rest):
        print(USAGE + "\n\n" + keys_help())
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
    from dtrain.train import run

    return run_and_report(cfg, lambda: run(cfg))


def keys_help(width: int = 100) -> str:
    """Every section and key with its default (workload, algo and comm at their default names: their
    other keys follow from the name chosen; `dtrain config ... algo.name=X` prints them for X)."""
    import textwrap

    from omegaconf import OmegaConf

    from dtrain.config import DEFAULTS, SECTIONS, RunConfig, section_module

    def keys(prefix: str, node: object, skip: tuple[str, ...] = ()) -> list[str]:
        data = OmegaConf.to_container(OmegaConf.structured(node))
        return [f"{prefix}{k}={'null' if v is None else v}" for k, v in data.items() if k not in skip]

    nested = ("workload", "algo", "comm", "optim", "lisa", "parallel")
    rows = [("run", keys("", RunConfig(), skip=nested))]
    for section in ("workload", "algo", "comm"):
        names = " | ".join(SECTIONS[section]) + (" | module.path:factory" if section == "workload" else "")
        config = section_module(section, DEFAULTS[section]).Config()
        rows.append((section, [f"{section}.name={DEFAULTS[section]} ({names})", *keys(f"{section}.", config, skip=("name",))]))
    rows.append(("optim", keys("optim.", RunConfig().optim)))
    rows.append(("parallel", keys("parallel.", RunConfig().parallel)))
    rows.append(("lisa", ["with algo=[lisa,ALGO]; lisa.KEY=... (dtrain config algo=[lisa,ddp] lists them)"]))
    out = ["keys (key=default; workload, algo and comm show their default name's keys: `dtrain config [CONFIG] "
           "algo.name=X` prints those of X):"]
    for section, items in rows:
        out.append(textwrap.fill("  ".join(items), width=width, initial_indent=f"  {section + ':':<10}",
                                 subsequent_indent=" " * 12, break_on_hyphens=False))
    return "\n".join(out)


def run_and_report(cfg: Any, train: Callable[[], dict[str, Any] | None]) -> int:
    """Run ``train()`` the way `dtrain train` does: a one-line error and exit code 1 for what a
    user can fix, the done line on rank 0. Shared by the fault-injection driver."""
    from dtrain.checkpoint import CheckpointError
    from dtrain.comm.base import CommError
    from dtrain.run_dir import RunDirError
    from dtrain.train import TrainingError, WorkerStopped

    try:
        summary = train()
    except (CheckpointError, TrainingError, CommError, RunDirError, ValueError) as e:
        code = 1 if isinstance(e, WorkerStopped) else _fail(str(e).splitlines()[0] if str(e) else type(e).__name__, 1)
        if cfg.comm.name == "torch":
            # The others were told and are leaving; a gloo group torn down while a peer still sat in
            # a collective can hold interpreter exit for seconds, so leave at once (outputs are on disk).
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        return code
    except KeyboardInterrupt:
        return _fail("interrupted; continue with resume=true", 130)
    if summary is not None:
        from dtrain.outcome import done_lines

        print("\n".join(done_lines(summary, out_dir=cfg.out_dir, plot=cfg.plot)), flush=True)
    return 0

if __name__ == "__main__":
    sys.exit(main())
