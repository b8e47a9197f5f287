"""Fault-injection soak: real torchrun/gloo jobs hit by kills, bad values, bad checkpoints and
misused out_dirs, each outcome classified against an uninterrupted run of the same config.

Classes (a trial's expected class is fixed by its fault; anything else is a failure of dtrain):
  same     the job (after a torchrun restart, or a rerun with resume=true) ends with the
           uninterrupted run's final loss and validation value, bit for bit; for the hivemind
           scenarios, the honest peers' result equals an honest-only run (intruders), or the
           joiner is in step within a round and nobody waited a timeout (joiner)
  skipped  a transient bad value from a peer: the affected updates were skipped on every worker
           together and reported in summary.json (skipped_steps > 0), weights finite
  stopped  every process exited non-zero, each printing one ``dtrain: error:`` line naming the
           cause, within 10 s of the first such line, and no output of another run changed
  wrong    anything else: a different result, NaN weights, a hang, a traceback, a lost file

    python benchmarks/soak.py --trials 60 --out benchmarks/results/soak.json
    python benchmarks/soak.py --quick            # a few trials, for CI
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, free_port, table, write_outputs  # noqa: E402

TINY = ["workload.n_layer=1", "workload.d_model=32", "workload.n_head=2", "workload.seq_len=32", "workload.batch_size=8",
        "workload.eval_batches=2", "threads=1", "progress=false", "plot=false", "steps=40", "eval_every=20",
        "ckpt_every=10", "comm.timeout_s=300", "max_nonfinite=3"]
ALGOS = {  # name -> (config, overrides, collectives a run makes; kills land inside training)
    "ddp": ("configs/ddp.yaml", [], 42),
    "diloco": ("configs/diloco.yaml", ["algo.sync_every=5"], 10),
    "noloco": ("configs/noloco.yaml", ["algo.sync_every=5", "algo.timeout_s=20"], 18),
}
STOP_WITHIN_S = 10.0  # --stop-within: a stop slower than this counts as wrong


class Job:
    """One torchrun job; stderr lines are timestamped as they arrive."""

    def __init__(self, nproc: int, args: list[str], *, restarts: int = 0) -> None:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr", "127.0.0.1",
               "--master-port", str(free_port()), "--max-restarts", str(restarts), *args]
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
        self.start = time.monotonic()
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.lines: list[tuple[float, str]] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append((time.monotonic(), line.rstrip("\n")))

    def wait(self, timeout: float = 300) -> int:
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            self._reader.join(timeout=5)
            return -999
        self.end = time.monotonic()
        self._reader.join(timeout=5)
        return self.proc.returncode

    def errors(self) -> list[tuple[float, str]]:
        return [(t, ln) for t, ln in self.lines if ln.startswith("dtrain: error:")]

    def traceback(self) -> bool:
        return any(f'File "{REPO / "dtrain"}' in ln for _, ln in self.lines)


def train_args(algo: str, out: Path, *extra: str, faults: list[str] | None = None) -> list[str]:
    config, overrides, _ = ALGOS[algo]
    entry = ["-m", "dtrain.testing.faults", *(faults or []), "--"] if faults else ["-m", "dtrain.cli", "train"]
    return [*entry, config, f"out_dir={out}", *TINY, *overrides, *extra]


def summary(out: Path) -> dict[str, Any] | None:
    try:
        return json.loads((out / "summary.json").read_text())
    except (OSError, ValueError):
        return None


def same(got: dict[str, Any] | None, ref: dict[str, Any]) -> bool:
    return got is not None and got["final_loss"] == ref["final_loss"] and got["eval"]["value"] == ref["eval"]["value"]


def digest(d: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(d.rglob("*")):
        if p.is_file() and ".lock" not in p.name:
            h.update(str(p.relative_to(d)).encode() + p.read_bytes())
    return h.hexdigest()


def stopped_cleanly(job: Job, code: int, nproc: int, cause: str) -> tuple[bool, str]:
    errs = job.errors()
    if code == 0 or code == -999:
        return False, "no stop" if code == 0 else "hang"
    if job.traceback():
        return False, "traceback"
    if not errs or cause not in errs[0][1]:
        return False, f"reason missing ({errs[0][1][:80] if errs else 'none'})"
    latency = job.end - errs[0][0]
    if latency > STOP_WITHIN_S:
        return False, f"stopped after {latency:.1f}s"
    return True, f"{len(errs)}/{nproc} lines, stop {latency:.1f}s"


# -- the faults -----------------------------------------------------------------------------------

def kill(rng: random.Random, root: Path, refs: dict, *, restarts: bool) -> dict[str, Any]:
    algo = rng.choice(sorted(refs["algos"]))
    rank, call = rng.randrange(2), rng.randint(3, ALGOS[algo][2])
    out = root / "run"
    job = Job(2, train_args(algo, out, faults=["--kill-at-call", str(call), "--only-rank", str(rank), "--only-first-attempt"]),
              restarts=1 if restarts else 0)
    code = job.wait()
    detail = f"{algo} rank {rank} call {call}"
    if not restarts:
        if code == 0:
            return {"fault": "kill -9", "detail": detail, "class": "wrong", "why": "job survived a kill without restarts"}
        code = Job(2, train_args(algo, out, "resume=true")).wait()
    got = summary(out)
    ok = code == 0 and same(got, refs[algo])
    fault = "kill -9 + torchrun restart" if restarts else "kill -9, rerun resume=true"
    return {"fault": fault, "detail": f"{detail}, resumed from {got and got.get('resumed_from')}",
            "class": "same" if ok else "wrong", "why": "" if ok else f"rc {code}, summary {got and got['final_loss']}"}


def bad_values(rng: random.Random, root: Path, refs: dict, *, transient: bool) -> dict[str, Any]:
    algo = rng.choice([a for a in ("ddp", "diloco") if a in refs["algos"]])
    kind = "nan"
    rank = rng.randrange(2)
    first = rng.randint(3, ALGOS[algo][2] - 2)
    until = ["--corrupt-until", str(first)] if transient else []
    out = root / "run"
    job = Job(2, train_args(algo, out, faults=["--corrupt", kind, "--corrupt-from", str(first), "--only-rank", str(rank), *until]))
    code = job.wait()
    detail = f"{algo} rank {rank} from call {first}{' once' if transient else ' on'}"
    if transient:
        got = summary(out)
        finite = got is not None and got["final_loss"] is not None and got["eval"]["value"] is not None
        skipped = got and max(w["skipped_steps"] + w["algorithm"].get("skipped_syncs", 0) for w in got["workers"])
        ok = code == 0 and finite and skipped > 0
        return {"fault": f"{kind} from a peer, once", "detail": detail, "class": "skipped" if ok else "wrong",
                "why": "" if ok else f"rc {code}, skipped {skipped}"}
    ok, why = stopped_cleanly(job, code, 2, "NaN/Inf")
    return {"fault": f"{kind} from a peer, persistent", "detail": detail, "class": "stopped" if ok else "wrong", "why": why}


def corrupt_checkpoint(rng: random.Random, root: Path, refs: dict) -> dict[str, Any]:
    algo = rng.choice(sorted(refs["algos"]))
    out = root / "run"
    assert Job(2, train_args(algo, out, "steps=30", "eval_every=30")).wait() == 0  # a run killed at step 30, as it were
    rank = rng.randrange(2)
    newest = out / "checkpoints" / f"rank{rank}" / "step_00000030.pt"
    raw = newest.read_bytes()
    cut = rng.choice(["truncate", "flip"])
    newest.write_bytes(raw[: len(raw) // 3] if cut == "truncate" else raw[:200] + bytes(b ^ 0xFF for b in raw[200:400]) + raw[400:])
    # The reference is an uninterrupted steps=30 run (steps is part of the trajectory: the schedule).
    code = Job(2, train_args(algo, out, "resume=true", "steps=30", "eval_every=30")).wait()
    got = summary(out)
    ref30 = refs.setdefault(f"{algo}@30", _reference(algo, root / "ref30", "steps=30", "eval_every=30"))
    ok = code == 0 and same(got, ref30) and got.get("resumed_from") == 20 and any("corrupt" in w for w in got["warnings"])
    return {"fault": f"corrupt newest checkpoint ({cut})", "detail": f"{algo} rank {rank}", "class": "same" if ok else "wrong",
            "why": "" if ok else f"rc {code}, resumed {got and got.get('resumed_from')}"}


def foreign_checkpoint(rng: random.Random, root: Path, refs: dict) -> dict[str, Any]:
    algo = rng.choice(sorted(refs["algos"]))
    out, other = root / "run", root / "other"
    assert Job(2, train_args(algo, out)).wait() == 0
    change = rng.choice(["workload.d_model=64", "seed=7", "optim.lr=0.01"])
    assert Job(2, train_args(algo, other, change)).wait() == 0
    rank = rng.randrange(2)
    shutil.rmtree(out / "checkpoints" / f"rank{rank}")
    shutil.copytree(other / "checkpoints" / f"rank{rank}", out / "checkpoints" / f"rank{rank}")
    before = digest(out)
    job = Job(2, train_args(algo, out, "resume=true"))
    code = job.wait()
    ok, why = stopped_cleanly(job, code, 2, "belongs to another run")
    ok = ok and digest(out) == before
    return {"fault": "foreign checkpoint on one rank", "detail": f"{algo} rank {rank} ({change})",
            "class": "stopped" if ok else "wrong", "why": why}


def reused_out_dir(rng: random.Random, root: Path, refs: dict) -> dict[str, Any]:
    algo = rng.choice(sorted(refs["algos"]))
    out = root / "run"
    assert Job(2, train_args(algo, out, "steps=40")).wait() == 0
    before = digest(out)
    job = Job(2, train_args(algo, out, rng.choice(["steps=20", "steps=40", "seed=3"])))
    code = job.wait()
    ok, why = stopped_cleanly(job, code, 2, "holds a finished")
    ok = ok and digest(out) == before
    return {"fault": "fresh run into a used out_dir", "detail": algo, "class": "stopped" if ok else "wrong", "why": why}


def shared_out_dir(rng: random.Random, root: Path, refs: dict) -> dict[str, Any]:
    algo = rng.choice([a for a in ("diloco", "noloco") if a in refs["algos"]])
    out = root / "run"
    # The first job is slowed (0.5 s per collective) so that it is surely still running when the
    # second one starts; the second is a plain `dtrain train`.
    long = ["steps=200", "eval_every=200", "ckpt_every=100"]
    first = Job(2, train_args(algo, out, *long, faults=["--delay-s", "0.5"]))
    deadline = time.monotonic() + 60
    while not (out / "metrics.jsonl").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    second = Job(2, train_args(algo, out, *long))
    code2 = second.wait()
    overlapped = first.proc.poll() is None
    code1 = first.wait()
    if not overlapped:
        return {"fault": "second job on a busy out_dir", "detail": algo, "class": "wrong",
                "why": "harness: the first job ended before the second was refused"}
    ok, why = stopped_cleanly(second, code2, 2, "in use by another job")
    got = summary(out)
    rows = (out / "metrics.jsonl").read_text().splitlines() if (out / "metrics.jsonl").exists() else []
    intact = code1 == 0 and got is not None and got["steps"] == 200 and all(json.loads(r) for r in rows)
    ok = ok and intact
    return {"fault": "second job on a busy out_dir", "detail": algo, "class": "stopped" if ok else "wrong",
            "why": why if intact else f"first job: rc {code1}"}


def hivemind_scenario(test: str, fault: str, outcome: str):
    """A real-peer hivemind scenario, run as the test that states its pass condition in full
    (peers, intruders or a joiner on loopback); passing is the outcome, anything else is wrong."""

    def trial(rng: random.Random, root: Path, refs: dict) -> dict[str, Any]:
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", test,
                               "--basetemp", str(root / "pytest")], cwd=REPO, capture_output=True, text=True, timeout=600,
                              env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO)))
        ok = proc.returncode == 0
        last = (proc.stdout.strip().splitlines() or ["?"])[-1]
        return {"fault": fault, "detail": test.split("::")[-1][:60], "class": outcome if ok else "wrong",
                "why": "" if ok else last}

    return trial


FAULTS = {
    "kill_restart": lambda rng, root, refs: kill(rng, root, refs, restarts=True),
    "kill_rerun": lambda rng, root, refs: kill(rng, root, refs, restarts=False),
    "nan_once": lambda rng, root, refs: bad_values(rng, root, refs, transient=True),
    "nan_persistent": lambda rng, root, refs: bad_values(rng, root, refs, transient=False),
    "corrupt_ckpt": corrupt_checkpoint,
    "foreign_ckpt": foreign_checkpoint,
    "reused_out_dir": reused_out_dir,
    "shared_out_dir": shared_out_dir,
}
HIVEMIND = {  # slower (real p2p daemons); a few of each in a full soak
    "hivemind_intruder": hivemind_scenario(
        "tests/test_hivemind_auth.py::test_a_keyed_diloco_run_attacked_by_intruders_equals_the_honest_run",
        "hivemind: intruders send x1000 (run key)", "same"),
    "hivemind_joiner": hivemind_scenario(
        "tests/test_hivemind_join.py::test_a_peer_joining_noloco_mid_run_is_in_step_within_a_round_and_nobody_waits",
        "hivemind: a peer joins NoLoCo mid-run", "same"),
}


def _reference(algo: str, out: Path, *extra: str) -> dict[str, Any]:
    code = Job(2, train_args(algo, out, *extra)).wait()
    got = summary(out)
    if code != 0 or got is None:
        raise RuntimeError(f"uninterrupted {algo} run failed (rc {code})")
    return got


def main(argv: list[str] | None = None) -> int:
    global STOP_WITHIN_S
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="one trial of a few faults (CI smoke test)")
    parser.add_argument("--hivemind-trials", type=int, default=2, help="trials of each hivemind scenario (full soak)")
    parser.add_argument("--stop-within", type=float, default=STOP_WITHIN_S,
                        help="seconds from the first reason line to the last process gone (a slower stop is wrong)")
    parser.add_argument("--out", help="write JSON here (and a .txt table beside it)")
    args = parser.parse_args(argv)
    STOP_WITHIN_S = args.stop_within
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="dtrain-soak-"))
    started = time.monotonic()
    try:
        algos = ["diloco"] if args.quick else list(ALGOS)
        refs: dict[str, Any] = {algo: _reference(algo, work / f"ref-{algo}") for algo in algos}
        refs["algos"] = algos
        if args.quick:
            plan = ["nan_persistent", "foreign_ckpt"]
        else:
            kinds = list(FAULTS)
            plan = [kinds[i % len(kinds)] for i in range(args.trials)]
            plan += [k for k in HIVEMIND for _ in range(args.hivemind_trials)]
            rng.shuffle(plan)
        trials = []
        for i, kind in enumerate(plan):
            root = work / f"trial{i:03d}"
            root.mkdir()
            t0 = time.monotonic()
            result = {**FAULTS, **HIVEMIND}[kind](rng, root, refs)
            result.update(trial=i, kind=kind, seconds=round(time.monotonic() - t0, 1))
            trials.append(result)
            print(f"[{i + 1}/{len(plan)}] {result['fault']}: {result['class']} {result['why']}", file=sys.stderr, flush=True)
            shutil.rmtree(root, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    counts: dict[str, dict[str, int]] = {}
    for t in trials:
        row = counts.setdefault(t["fault"], {"same": 0, "skipped": 0, "stopped": 0, "wrong": 0})
        row[t["class"]] += 1
    rows = [{"fault": f, **c, "trials": sum(c.values())} for f, c in counts.items()]
    total = {k: sum(r[k] for r in rows) for k in ("same", "skipped", "stopped", "wrong", "trials")}
    rows.append({"fault": "all", **total})
    text = table(rows, [("fault", "fault"), ("trials", "trials"), ("same", "same result"), ("skipped", "skipped+reported"),
                        ("stopped", f"clean stop <{STOP_WITHIN_S:g}s"), ("wrong", "wrong/lost")])
    text += f"\n{len(trials)} trials in {time.monotonic() - started:.0f}s; wrong/lost: {total['wrong']}"
    write_outputs(args.out, {"trials": trials, "totals": total, "rows": rows, "seed": args.seed}, text)
    return 1 if total["wrong"] else 0


if __name__ == "__main__":
    sys.exit(main())
