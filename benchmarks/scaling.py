"""Scaling in the worker count N: DiLoCo and NoLoCo at N = 4, 8, 16, 32 (simulated: N worker threads on
the local backend) at equal tokens per worker, and the NoLoCo paper's sync-latency model extrapolated
to N = 1,024.

Loss: `dtrain train configs/frontier.yaml` with a small model (--model LAYERSxD), --batch sequences of
--seq-len bytes per worker, --steps steps, H=--h, the papers' outer settings; final validation loss
(mean over workers) against N. Latency: t = the time of one exchange of a model-sized buffer between
two gloo processes on loopback (median of --reps, measured here), and on the WAN harness's links
from their measured RTT and bulk throughput (benchmarks/results/wan.json: t = RTT/2 + bytes/rate).
The paper's model: a tree all-reduce costs about 2·t·log2(N), a NoLoCo pair exchange 2·t.

    python benchmarks/scaling.py [--quick] [--out benchmarks/results/scaling.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import REPO, free_port, table, write_outputs
from frontier_runs import DEFAULT_HP, Run, Runner

EXTRAPOLATE = [4, 8, 16, 32, 64, 128, 256, 512, 1024]


def _exchange_worker(nbytes: int, reps: int, out: str) -> None:
    import torch

    from dtrain.comm.torch_backend import TorchComm

    comm = TorchComm()
    buf = torch.zeros(nbytes // 4)
    times = []
    for i in range(reps + 2):
        comm.barrier()
        t0 = time.perf_counter()
        comm.exchange([buf], 1 - comm.rank, tag=i)
        if i >= 2:
            times.append(time.perf_counter() - t0)
    if comm.rank == 0:
        Path(out).write_text(json.dumps({"t_s": statistics.median(times)}))
    comm.close()


def loopback_t(nbytes: int, reps: int, tmp: Path) -> float:
    out = tmp / "t.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), str(Path(__file__).resolve()), "--exchange-worker", str(nbytes), str(reps), str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"exchange timing failed: {proc.stderr[-2000:]}")
    return json.loads(out.read_text())["t_s"]


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--exchange-worker":
        _exchange_worker(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="N = 2, 4; 20 steps (a smoke run)")
    p.add_argument("--ns", type=int, nargs="+", default=[4, 8, 16, 32])
    p.add_argument("--model", default="1x32")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--h", type=int, default=30)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--parallel", type=int, default=2)
    p.add_argument("--latency-only", action="store_true", help="the latency model alone (no training runs)")
    p.add_argument("--cache", type=Path, default=Path("runs/scaling_cache"))
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.quick:
        args.ns, args.steps, args.h, args.reps = [2, 4], 20, 5, 3
    t0 = time.perf_counter()
    n_layer, d_model = (int(v) for v in args.model.split("x"))
    extra = (f"workload.n_layer={n_layer}", f"workload.d_model={d_model}", "workload.n_head=2", f"workload.seq_len={args.seq_len}",
             "workload.eval_batches=8", "workload.eval_batch_size=32", f"optim.warmup_steps={max(1, args.steps // 20)}")
    runner = Runner(cache=args.cache / ("quick" if args.quick else "full"), parallel=args.parallel, nice=0 if args.quick else 10)
    runs = [Run(m, args.h, tuple(sorted(DEFAULT_HP[m].items())), workers=n, steps=args.steps, batch=args.batch, extra=extra)
            for n in args.ns for m in ("diloco", "noloco")]
    rows = []
    for run, res in zip(runs, [] if args.latency_only else runner.many(runs)):
        rows.append({"method": run.method, "N": run.workers, "val_loss": res["val_loss"], "spread": res["val_loss_spread"],
                     "bytes_sent_per_worker": res["bytes_sent_per_worker"], "wall_s": res["wall_s"]})
    text = table(rows, [("method", "method"), ("N", "N"), ("val_loss", "val loss"), ("spread", "max-min over workers"),
                        ("bytes_sent_per_worker", "bytes/worker"), ("wall_s", "wall s")])
    text += (f"\n\nchar_lm {args.model}, {args.batch}x{args.seq_len} bytes per worker per step, {args.steps} steps, H={args.h}, "
             "DiLoCo outer 0.7/0.9 Nesterov, NoLoCo 0.7/0.5 pairs; equal tokens per worker at every N.")
    # latency model
    import tempfile

    from dtrain.workloads import char_lm
    frontier_params = sum(p.numel() for p in char_lm.CharLM(char_lm.Config(n_layer=2, d_model=64), seed=0).build_model().parameters())
    nbytes = frontier_params * 4
    with tempfile.TemporaryDirectory() as tmp:
        t_loop = loopback_t(nbytes, args.reps, Path(tmp))
    links = {"loopback (measured)": t_loop}
    wan = REPO / "benchmarks/results/wan.json"
    if wan.exists():
        for name, probe in json.loads(wan.read_text()).get("probes", {}).items():  # "rtt_ms=11.6 mbit_s=99.8"
            f = dict(kv.split("=") for kv in probe.split())
            links[f"WAN {name} (harness probe)"] = float(f["rtt_ms"]) / 2e3 + nbytes * 8 / (float(f["mbit_s"]) * 1e6)
    lat_rows = [{"link": k, "N": n, "tree_ms": 2 * v * math.log2(n) * 1e3, "pair_ms": 2 * v * 1e3} for k, v in links.items()
                for n in EXTRAPOLATE]
    text += f"\n\nSync latency per outer step for the frontier model ({nbytes / 1e3:.0f} KB of fp32), t = one exchange:\n"
    text += table(lat_rows, [("link", "link"), ("N", "N"), ("tree_ms", "tree all-reduce 2t·log2N ms"), ("pair_ms", "NoLoCo pair 2t ms")])
    text += f"\n\nWall {time.perf_counter() - t0:.0f}s."
    write_outputs(args.out, {"quick": args.quick, "rows": rows, "latency": lat_rows, "t_s": links}, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
