"""Launch real multi-process jobs from tests: torchrun over gloo on CPU, on a free loopback port."""

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


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO) + os.pathsep + env.get("PYTHONPATH", "")})
    env.pop("MASTER_ADDR", None)
    env.pop("MASTER_PORT", None)
    env.update(extra)
    return env


def torchrun(nproc: int, args: list[str], *, timeout: float = 240, extra_torchrun: list[str] | None = None,
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run ``torchrun --nproc-per-node nproc ARGS`` (ARGS: a script path or ``-m module ...``)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()), *(extra_torchrun or []), *args]
    return subprocess.run(cmd, cwd=REPO, env=env or child_env(), capture_output=True, text=True, timeout=timeout)


def train(nproc: int, config: str, out_dir: Path, *overrides: str, timeout: float = 240,
          extra_torchrun: list[str] | None = None) -> dict[str, Any]:
    """`dtrain train` under torchrun; returns summary.json, or fails the test with the job's output."""
    args = ["-m", "dtrain.cli", "train", config, f"out_dir={out_dir}", "progress=false", "plot=false", *overrides]
    proc = torchrun(nproc, args, timeout=timeout, extra_torchrun=extra_torchrun)
    if proc.returncode != 0:
        raise AssertionError(f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return json.loads((Path(out_dir) / "summary.json").read_text())


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run `python -m dtrain.cli ARGS` in one process."""
    return subprocess.run([sys.executable, "-m", "dtrain.cli", *args], cwd=REPO, env=child_env(),
                          capture_output=True, text=True, timeout=timeout)
