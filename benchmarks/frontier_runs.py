"""Runs of the frontier workload (configs/frontier.yaml) for benchmarks/frontier.py and scaling.py.

A `Run` is one `dtrain train` job: a method (DDP, DiLoCo, NoLoCo, their int8 forms, ...), its H, the
hyperparameters, the worker count, the seed and the regime (per-worker batch). Every run goes through
the same `dtrain train` entry point, on the local backend (N workers as threads of one process, one
torch thread each) unless ``launcher="torchrun"``; the comm counts bytes the same way in both. Results
are cached as JSON by the run's key, so a long benchmark killed half-way resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import REPO, free_port

CONFIG = "configs/frontier.yaml"


@dataclass(frozen=True)
class Method:
    """One line of the frontier: how its algo section is built from H and the swept values."""

    name: str
    label: str
    algo: str  # algo.name
    extra: tuple[str, ...] = ()  # fixed algo.* overrides (compression, ...)
    outer: bool = True  # has H and an outer lr/momentum
    base: str = ""  # the method whose swept hyperparameters it uses ("" = its own)

    def overrides(self, h: int | None, hp: dict[str, float]) -> list[str]:
        out = [f"algo.name={self.algo}", *self.extra, f"optim.lr={hp['lr']}"]
        if self.outer:
            out += [f"algo.sync_every={h}", f"algo.outer_lr={hp['outer_lr']}", f"algo.outer_momentum={hp['outer_momentum']}"]
        return out


def _has_key(algo: str, key: str) -> bool:
    from dtrain.config import section_module

    return any(f.name == key for f in dataclasses.fields(section_module("algo", algo).Config))


def methods() -> dict[str, Method]:
    """Every method this tree can run: int8 DiLoCo and Streaming DiLoCo appear once their keys exist."""
    out = [Method("ddp", "DDP", "ddp", outer=False),
           Method("diloco", "DiLoCo", "diloco"),
           Method("noloco", "NoLoCo", "noloco"),
           Method("noloco_int8", "NoLoCo int8", "noloco", ("algo.compression=int8",), base="noloco")]
    if _has_key("diloco", "compression"):
        out.append(Method("diloco_int8", "DiLoCo int8", "diloco", ("algo.compression=int8",), base="diloco"))
        out.append(Method("diloco_int4", "DiLoCo int4", "diloco", ("algo.compression=int4",), base="diloco"))
    from dtrain.config import ALGORITHMS

    if "streaming_diloco" in ALGORITHMS:  # its defaults: 4 fragments, overlap 1 step, mixing 0.5
        out.append(Method("streaming", "Streaming DiLoCo", "streaming_diloco", base="diloco"))
        if _has_key("streaming_diloco", "compression"):
            out.append(Method("streaming_int4", "Streaming DiLoCo int4", "streaming_diloco", ("algo.compression=int4",),
                              base="diloco"))
    return {m.name: m for m in out}


DEFAULT_HP = {"ddp": {"lr": 3e-3},
              "diloco": {"lr": 3e-3, "outer_lr": 0.7, "outer_momentum": 0.9},  # DiLoCo paper
              "noloco": {"lr": 3e-3, "outer_lr": 0.7, "outer_momentum": 0.5}}  # NoLoCo paper


@dataclass(frozen=True)
class Run:
    method: str
    h: int | None
    hp: tuple[tuple[str, float], ...]
    workers: int = 4
    seed: int = 0
    steps: int = 1500
    batch: int | None = None  # sequences per worker per step; None = the config's
    extra: tuple[str, ...] = ()  # further overrides (model size for --quick, warm-up, gamma, ...)
    launcher: str = "local"  # local | torchrun

    def overrides(self, table: dict[str, Method]) -> list[str]:
        out = table[self.method].overrides(self.h, dict(self.hp))
        out += [f"seed={self.seed}", f"steps={self.steps}", f"eval_every={max(1, self.steps // 12)}"]
        if self.batch is not None:
            out.append(f"workload.batch_size={self.batch}")
        return out + list(self.extra)

    def key(self) -> str:
        blob = json.dumps(dataclasses.asdict(self), sort_keys=True)
        return hashlib.sha1(blob.encode()).hexdigest()[:16]


def train(run: Run, out_dir: Path, table: dict[str, Method], *, nice: int = 10, in_process: bool = False) -> dict[str, Any]:
    """One `dtrain train` job of ``run``; the numbers a frontier row needs and the loss curve. ``in_process``
    (local runs only) calls the same entry point in this process: no interpreter start, for smoke runs."""
    base = ["progress=false", "plot=false", "ckpt_every=0", "threads=1", f"out_dir={out_dir}", *run.overrides(table)]
    local = ["comm.name=local", f"comm.workers={run.workers}", "comm.timeout_s=600"]
    t0 = time.perf_counter()
    if in_process and run.launcher == "local":
        from dtrain.config import load
        from dtrain.train import run as train_run

        train_run(load(CONFIG, [*local, *base]))
    else:
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
        pre = ["nice", "-n", str(nice)] if nice else []
        if run.launcher == "torchrun":
            cmd = [*pre, sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(run.workers), "--master-addr",
                   "127.0.0.1", "--master-port", str(free_port()), "-m", "dtrain.cli", "train", CONFIG, "comm.name=torch", *base]
        else:
            cmd = [*pre, sys.executable, "-m", "dtrain.cli", "train", CONFIG, *local, *base]
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{run} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    summary = json.loads((out_dir / "summary.json").read_text())
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    workers = summary["workers"]
    return {
        "val_loss": summary["eval"]["mean_over_workers"],  # NoLoCo's replicas differ: every worker's model counts
        "val_loss_rank0": summary["eval"]["value"],
        "val_loss_spread": max(w["eval"]["val_loss"] for w in workers) - min(w["eval"]["val_loss"] for w in workers),
        "bytes_sent_per_worker": summary["comm"]["mean"]["bytes_sent"],
        "collectives": summary["comm"]["max"]["collectives"],
        "blocked_s": summary["comm"]["mean"]["blocked_s"],
        "train_time_s": summary["train_time_s"], "wall_s": time.perf_counter() - t0,
        "skipped_steps": summary["skipped_steps"], "nonfinite_steps": summary["nonfinite_steps"],
        "algorithm": workers[0]["algorithm"],
        "curve": [{"step": r["step"], "val_loss": r["eval"], "bytes_sent": r.get("bytes_sent")}
                  for r in rows if r.get("eval") is not None],
    }


@dataclass
class Runner:
    """Runs `Run`s ``parallel`` at a time, each result cached under ``cache`` by the run's key."""

    cache: Path | None
    parallel: int = 1
    nice: int = 10
    table: dict[str, Method] = field(default_factory=methods)
    in_process: bool = False  # local runs in this process, one at a time (smoke runs)
    only_cached: bool = False  # report what has finished; run nothing
    partial: bool = False  # with only_cached: an unfinished run reports its curve so far (rank 0's log)
    log: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _cached(self, run: Run) -> dict[str, Any] | None:
        path = self.cache / f"{run.key()}.json" if self.cache else None
        if path is not None and path.exists():
            return json.loads(path.read_text())["result"]
        return None

    def one(self, run: Run) -> dict[str, Any] | None:
        got = self._cached(run)
        if got is None and self.only_cached and self.partial and self.cache is not None:
            return partial_result(self.cache / "runs" / run.key())
        if got is not None or self.only_cached:
            return got
        if self.cache is not None:  # the run's own files stay beside its cached result (curves of a killed run too)
            out_dir = self.cache / "runs" / run.key()
            if out_dir.exists():
                shutil.rmtree(out_dir)  # a killed attempt: start over
            result = train(run, out_dir, self.table, nice=self.nice, in_process=self.in_process)
        else:
            with tempfile.TemporaryDirectory(prefix="dtrain-frontier-") as tmp:
                result = train(run, Path(tmp) / "run", self.table, nice=self.nice, in_process=self.in_process)
        if self.cache is not None:
            self.cache.mkdir(parents=True, exist_ok=True)
            (self.cache / f"{run.key()}.json").write_text(json.dumps({"run": dataclasses.asdict(run), "result": result}))
        with self._lock:
            self.log(f"[{run.method} H={run.h} N={run.workers} seed={run.seed} b={run.batch} {dict(run.hp)}{list(run.extra) or ''}] "
                     f"val {result['val_loss']:.4f}, {result['bytes_sent_per_worker'] / 1e6:.2f} MB/worker, {result['wall_s']:.0f}s")
        return result

    def many(self, runs: Iterable[Run]) -> list[dict[str, Any] | None]:
        runs = list(runs)
        with ThreadPoolExecutor(1 if self.in_process else max(1, self.parallel)) as pool:
            return list(pool.map(self.one, runs))


def seed_stats(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample std (None for one seed)."""
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else None)


def partial_result(out_dir: Path) -> dict[str, Any] | None:
    """What an unfinished run's rank-0 log holds: its evaluations so far (``partial_step`` = the last)."""
    path = out_dir / "metrics.jsonl"
    if not path.exists():
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    curve = [{"step": r["step"], "val_loss": r["eval"], "bytes_sent": r.get("bytes_sent")} for r in rows if r.get("eval") is not None]
    if len(curve) < 2:
        return None
    return {"val_loss": curve[-1]["val_loss"], "bytes_sent_per_worker": curve[-1]["bytes_sent"], "partial_step": curve[-1]["step"],
            "val_loss_spread": None, "wall_s": rows[-1]["wall_s"], "curve": curve, "algorithm": {}}


def at_step(result: dict[str, Any], step: int) -> dict[str, Any]:
    """``result`` cut to its evaluation at ``step`` (for comparing unfinished runs at equal steps)."""
    point = next(p for p in result["curve"] if p["step"] == step)
    return {**result, "val_loss": point["val_loss"], "bytes_sent_per_worker": point["bytes_sent"], "partial_step": step,
            "curve": [p for p in result["curve"] if p["step"] <= step]}
