"""Shared by the benchmark scripts: run `dtrain train` under torchrun, print tables, write JSON."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_train(nproc: int, config: str, out_dir: Path, overrides: list[str], *, timeout: float = 1800,
                   entry: list[str] | None = None) -> dict[str, Any]:
    """One `dtrain train` job under torchrun (gloo, loopback); returns its summary.json.

    ``entry`` replaces ``-m dtrain.cli train`` for a benchmark that wraps the entry point itself.
    """
    entry = entry or ["-m", "dtrain.cli", "train"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), *entry, config, f"out_dir={out_dir}",
           "progress=false", "plot=false", *overrides]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{config} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads((Path(out_dir) / "summary.json").read_text())


def table(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> str:
    """Fixed-width text table; columns are (key, header)."""
    cells = [[h for _, h in columns]] + [[_fmt(r.get(k)) for k, _ in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.4g}" if abs(v) < 1e5 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def write_outputs(out: str | None, payload: dict[str, Any], text: str) -> None:
    print(text)
    if out:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(payload, indent=2))
        path.with_suffix(".txt").write_text(text + "\n")
