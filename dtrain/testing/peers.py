"""Start real hivemind peers as processes on loopback (tests, benchmarks, the launcher's demo).

Every peer runs in its own session (process group), so `stop` can reap whatever a killed peer
left behind; `stray_daemons` lists p2pd processes still alive in those groups, which a test
asserts is empty *before* `stop` cleans up.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def peer_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO) + os.pathsep + env.get("PYTHONPATH", "")})
    return env


def start_peer(train_args: list[str], *, log_path: Path, faults: list[str] | None = None,
               initial_peers: list[str] | None = None, maddr_file: Path | None = None) -> subprocess.Popen:
    """One peer: `dtrain train TRAIN_ARGS` (or the faults driver when ``faults`` is given)."""
    extra = []
    if initial_peers:
        extra.append(f"comm.initial_peers=[{','.join(initial_peers)}]")
    if maddr_file is not None:
        extra.append(f"comm.maddr_file={maddr_file}")
    if faults is None:
        cmd = [sys.executable, "-m", "dtrain.cli", "train", *train_args, *extra]
    else:
        cmd = [sys.executable, "-m", "dtrain.testing.faults", *faults, "--", *train_args, *extra]
    log = open(log_path, "w")  # noqa: SIM115 - handed to the child, closed when the parent exits
    return subprocess.Popen(cmd, cwd=REPO, env=peer_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def read_maddr(path: Path, proc: subprocess.Popen, *, timeout: float = 120.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().strip():
            return path.read_text().split()[0]
        if proc.poll() is not None:
            raise RuntimeError(f"first peer exited ({proc.returncode}) before listening")
        time.sleep(0.1)
    raise TimeoutError(f"first peer wrote no address to {path} within {timeout}s")


def start_run(n: int, train_args: list[str], workdir: Path, *, faults: dict[int, list[str]] | None = None) -> tuple[list[subprocess.Popen], str]:
    """The first peer, then n-1 more that join it; returns the processes and the first's multiaddr."""
    faults = faults or {}
    maddr = workdir / "maddr0"
    first = start_peer([*train_args, "comm.rank=0"], log_path=workdir / "peer0.log", faults=faults.get(0), maddr_file=maddr)
    addr = read_maddr(maddr, first)
    procs = [first] + [
        start_peer([*train_args, f"comm.rank={i}"], log_path=workdir / f"peer{i}.log", faults=faults.get(i), initial_peers=[addr])
        for i in range(1, n)
    ]
    return procs, addr


def wait(procs: list[subprocess.Popen], timeout: float) -> list[int | None]:
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    return [p.poll() for p in procs]


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def stray_daemons(procs: list[subprocess.Popen], *, settle_s: float = 5.0) -> list[int]:
    """p2pd processes still alive in the peers' process groups (waits up to settle_s for watchdogs)."""
    groups = {p.pid for p in procs}
    deadline = time.monotonic() + settle_s
    while True:
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                name = (entry / "comm").read_text().strip()
            except OSError:
                continue
            if name == "p2pd" and _pgid(int(entry.name)) in groups:
                found.append(int(entry.name))
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def stop(procs: list[subprocess.Popen]) -> None:
    """Kill every peer's whole process group (safety net after a test)."""
    for p in procs:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:
            pass
