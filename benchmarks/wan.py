"""DDP vs DiLoCo vs NoLoCo over emulated WAN links (launchers/wan.py; needs root for namespaces).

Each of 4 workers sits in its own network namespace behind a 100 Mbit/s link (tc tbf, both
directions), first with no added latency, then with 50 ms added one-way between any two workers
(user-space TUN delay, see launchers/wan.py). Reported per algorithm: training time until the
validation loss first reaches ``--target`` (evaluation excluded, as AlgoPerf counts it), wall time
for the whole run, seconds blocked on communication (mean over workers) and bytes sent, with
ratios against DDP on the same network. ``noloco/phi-with-delta`` is NoLoCo with φ sent together
with Δ at the outer step (``phi_lead_steps=0``, the paper's way) instead of ahead of it: the
difference in its blocked time is what sending φ early saves.

    python benchmarks/wan.py [--quick] [--out benchmarks/results/wan.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
MODEL = ["workload.n_layer=2", "workload.d_model=64", "workload.n_head=4", "threads=1", "progress=false",
         "plot=false", "ckpt_every=0"]
ALGOS = [
    ("ddp", "configs/ddp.yaml", []),
    ("diloco", "configs/diloco.yaml", []),
    ("noloco", "configs/noloco.yaml", []),
    ("noloco/phi-with-delta", "configs/noloco.yaml", ["algo.phi_lead_steps=0"]),
]
NETWORKS = [("100mbit", "100mbit", 0.0), ("100mbit+50ms", "100mbit", 50.0)]


def run_wan(workers: int, rate: str, delay_ms: float, config: str, out_dir: Path, overrides: list[str]) -> dict[str, Any]:
    cmd = [sys.executable, str(REPO / "launchers" / "wan.py"), "--workers", str(workers), "--rate", rate,
           "--delay-ms", str(delay_ms), "--", config, f"out_dir={out_dir}", *overrides]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"{config} over {rate}/{delay_ms}ms failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads((out_dir / "summary.json").read_text())


def probe(rate: str, delay_ms: float) -> str:
    cmd = [sys.executable, str(REPO / "launchers" / "wan.py"), "--workers", "2", "--rate", rate, "--delay-ms", str(delay_ms), "--probe"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300).stdout.strip()


def row(net: str, algo: str, summary: dict[str, Any]) -> dict[str, Any]:
    workers = summary["workers"]
    return {
        "network": net, "algo": algo, "val_loss": summary["eval"]["mean_over_workers"],
        "time_to_target_s": summary["time_to_target_s"], "reached": summary["reached_target"],
        "train_time_s": summary["train_time_s"], "wall_s": max(w["wall_s"] for w in workers),
        "blocked_s": statistics.mean(w["comm"]["blocked_s"] for w in workers),
        "bytes_sent_per_worker": statistics.mean(w["comm"]["bytes_sent"] for w in workers),
        "collectives": max(w["comm"]["collectives"] for w in workers), "algorithm": workers[0]["algorithm"],
    }


def table(rows: list[dict[str, Any]], target: float) -> str:
    out = [f"{'network':<13} {'algorithm':<22} {'val_loss':>8} {'to target s':>11} {'vs DDP':>7} {'wall s':>7} {'vs DDP':>7} "
           f"{'blocked s':>9} {'vs DDP':>7} {'MB sent':>8}"]
    for r in rows:
        ddp = next(x for x in rows if x["network"] == r["network"] and x["algo"] == "ddp")
        ttt = f"{r['time_to_target_s']:11.1f}" if r["time_to_target_s"] is not None else f"{'not reached':>11}"
        ttt_ratio = (f"{r['time_to_target_s'] / ddp['time_to_target_s']:7.2f}"
                     if r["time_to_target_s"] is not None and ddp["time_to_target_s"] else f"{'-':>7}")
        out.append(f"{r['network']:<13} {r['algo']:<22} {r['val_loss']:8.4f} {ttt} {ttt_ratio} {r['wall_s']:7.1f} "
                   f"{r['wall_s'] / ddp['wall_s']:7.2f} {r['blocked_s']:9.2f} {r['blocked_s'] / max(ddp['blocked_s'], 1e-9):7.2f} "
                   f"{r['bytes_sent_per_worker'] / 1e6:8.1f}")
    out.append(f"\ntarget: char_lm val_loss <= {target} (training time to first reach it, evaluation excluded)")
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="60 steps, H=20, bandwidth-only network (smoke run)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--target", type=float, default=2.6, help="char_lm val_loss target that every algorithm reaches")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    steps = 60 if args.quick else args.steps
    common = [*MODEL, f"steps={steps}", "eval_every=25", f"workload.target={args.target}"]
    networks = NETWORKS[:1] if args.quick else NETWORKS
    rows, probes = [], {}
    with tempfile.TemporaryDirectory(prefix="dtrain-bench-wan-") as tmp:
        for net, rate, delay in networks:
            probes[net] = probe(rate, delay)
            print(f"[{net}] probe: {probes[net]}", file=sys.stderr, flush=True)
            for i, (algo, config, extra) in enumerate(ALGOS):
                h = ["algo.sync_every=20"] if args.quick and algo != "ddp" else []
                t0 = time.perf_counter()
                out_dir = Path(tmp) / f"{net}-{i}"
                rows.append(row(net, algo, run_wan(args.workers, rate, delay, config, out_dir, [*common, *h, *extra])))
                print(f"[{net}/{algo}] {time.perf_counter() - t0:.0f}s", file=sys.stderr, flush=True)
    text = table(rows, args.target)
    text += "\nlink probes (worker 1 -> 0, TCP connect RTT and 12.5 MB bulk throughput): " + "; ".join(f"{k}: {v}" for k, v in probes.items())
    text += (f"\n{args.workers} workers, {steps} steps, char_lm (2 layers, d=64, 137k params), inner AdamW; "
             "DiLoCo H=50; NoLoCo H=50 pairs; one torchrun per network namespace, gloo over TCP.")
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"steps": steps, "workers": args.workers, "target": args.target,
                                        "probes": probes, "results": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
