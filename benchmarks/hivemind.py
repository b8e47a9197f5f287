"""NoLoCo on the hivemind backend vs on torch/gloo, N peers on loopback, plus the cost of joining.

    python benchmarks/hivemind.py [--quick] [--peers 4] [--steps 200] [--out results.json]

Both systems run the same `dtrain train configs/noloco.yaml` job (same workload, seed, steps);
the table reports per-step training time, seconds blocked on communication, bytes sent per
worker (the backends' own counters, from summary.json) and the final validation loss, with
hivemind/gloo ratios. Then a fresh peer joins a running hivemind job: the time from launching it
to having fetched a live peer's state ("join"), and to finishing the run ("join + catch up").
On one machine both backends share the same CPUs; loopback hides the WAN latency that
hivemind is for (use launchers/wan.py for that).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dtrain.testing import peers  # noqa: E402


def job_args(steps: int, quick: bool) -> list[str]:
    size = ["workload.n_layer=1", "workload.d_model=32", "workload.n_head=2", "workload.seq_len=32"] if quick else []
    return ["configs/noloco.yaml", *size, "workload.batch_size=8", "workload.eval_batches=4", f"steps={steps}",
            f"eval_every={steps}", "algo.sync_every=10", f"ckpt_every={max(10, steps // 5)}", "progress=false",
            "plot=false", "threads=1"]


def row(name: str, s: dict, steps: int) -> dict:
    comm = s["comm"]
    return {"system": name, "workers": s["workers_reporting"], "step_s": s["train_time_s"] / steps,
            "wall_s": s["wall_s"], "blocked_s": comm["max"]["blocked_s"], "bytes_sent": comm["mean"]["bytes_sent"],
            "val_loss": s["eval"]["value"]}


def run_gloo(n: int, args: list[str], out: Path) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n), "--master-addr", "127.0.0.1",
           "--master-port", str(peers_free_port()), "-m", "dtrain.cli", "train", *args, f"out_dir={out}"]
    proc = subprocess.run(cmd, cwd=REPO, env=peers.peer_env(), capture_output=True, text=True, timeout=1200)
    if proc.returncode != 0:
        raise SystemExit(f"gloo run failed:\n{proc.stderr[-3000:]}")
    return json.loads((out / "summary.json").read_text())


def peers_free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def hivemind_args(args: list[str], out: Path, run_id: str, n: int) -> list[str]:
    return [*args, f"out_dir={out}", "comm.name=hivemind", f"comm.run_id={run_id}", f"comm.min_peers={n}", "resume=true"]


def run_hivemind(n: int, args: list[str], work: Path) -> dict:
    procs, _ = peers.start_run(n, hivemind_args(args, work / "out", "bench", n), work)
    try:
        codes = peers.wait(procs, timeout=1200)
        if codes != [0] * n:
            raise SystemExit(f"hivemind run failed: {codes}; logs in {work}")
    finally:
        peers.stop(procs)
    return json.loads((work / "out" / "summary.json").read_text())


def run_join(n: int, args: list[str], work: Path, *, delay_s: float) -> dict:
    """n-1 peers (slowed by delay_s per call so the run outlasts a joiner's start-up) and one joiner."""
    run_args = hivemind_args(args, work / "out", "join", n - 1)
    procs, addr = peers.start_run(n - 1, run_args, work, faults={i: ["--delay-s", str(delay_s)] for i in range(n - 1)})
    joiner = None
    try:
        ckpt_dir = work / "out" / "checkpoints" / "rank0"
        while not any(ckpt_dir.glob("step_*.pt")) and procs[0].poll() is None:
            time.sleep(0.1)
        t0 = time.monotonic()
        jargs = [a for a in run_args if not a.startswith(("out_dir=", "comm.min_peers"))] + [f"out_dir={work / 'joiner'}"]
        joiner = peers.start_peer(jargs, log_path=work / "joiner.log", initial_peers=[addr])
        joined = None
        while joiner.poll() is None:
            if joined is None and "joins run" in (work / "joiner.log").read_text():
                joined = time.monotonic() - t0
            time.sleep(0.05)
        total = time.monotonic() - t0
        peers.wait(procs, timeout=600)
        text = (work / "joiner.log").read_text()
        at = re.search(r"joins run '\w+' at step (\d+)", text)
        out = {"join_s": joined, "join_and_finish_s": total, "joined_at_step": int(at.group(1)) if at else None,
               "joiner_exit": joiner.returncode}
        if joiner.returncode != 0:
            out["joiner_log_tail"] = text[-1500:]
        return out
    finally:
        peers.stop([*procs, *([joiner] if joiner else [])])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--peers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--quick", action="store_true", help="tiny model, 60 steps")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    steps = 60 if a.quick else a.steps
    args = job_args(steps, a.quick)
    with tempfile.TemporaryDirectory(prefix="bench_hivemind_") as tmp:
        tmp = Path(tmp)
        (tmp / "h").mkdir()
        (tmp / "j").mkdir()
        gloo = row("noloco on gloo", run_gloo(a.peers, args, tmp / "gloo"), steps)
        hive = row("noloco on hivemind", run_hivemind(a.peers, args, tmp / "h"), steps)
        join = run_join(a.peers, args, tmp / "j", delay_s=1.0 if a.quick else 0.3)
    cols = ("step_s", "blocked_s", "bytes_sent", "val_loss", "wall_s")
    lines = [f"NoLoCo, {a.peers} peers on loopback, {steps} steps ({'tiny' if a.quick else 'default'} char_lm)",
             f"{'system':<22}" + "".join(f"{c:>14}" for c in cols)]
    for r in (gloo, hive):
        lines.append(f"{r['system']:<22}" + "".join(f"{r[c]:>14.4g}" for c in cols))
    ratio = {c: (hive[c] / gloo[c] if gloo[c] else float("nan")) for c in cols}
    lines.append(f"{'hivemind / gloo':<22}" + "".join(f"{ratio[c]:>14.3g}" for c in cols))
    lines.append(f"join: a new peer fetched state in {join['join_s'] or float('nan'):.1f}s after launch (joined at step "
                 f"{join['joined_at_step']}), finished {join['join_and_finish_s']:.1f}s after launch (exit {join['joiner_exit']})")
    print("\n".join(lines))
    if a.out:
        a.out.write_text(json.dumps({"steps": steps, "peers": a.peers, "quick": a.quick, "gloo": gloo, "hivemind": hive,
                                     "ratio": ratio, "join": join, "table": lines}, indent=2))


if __name__ == "__main__":
    main()
