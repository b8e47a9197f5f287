"""The per-worker batch curve of the frontier workload: validation loss at equal *steps* for several
batch sizes on one worker (no communication), so the frontier's batch is chosen where quadrupling it
buys little, the regime in which low-communication training is worth choosing over DDP.

Each size is one `dtrain train configs/frontier.yaml` run with ``comm.name=local comm.workers=1
algo.name=none`` and ``workload.batch_size`` (sequences of ``workload.seq_len`` bytes) changed;
model, optimizer, schedule and steps are the config's. Runs go two at a time (the machine has two
cores), each with one torch thread.

    python benchmarks/batch_curve.py [--quick] [--sizes 16 64 256] [--steps 3000] [--out benchmarks/results/batch_curve.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from common import REPO, table, write_outputs
from dtrain.config import load

CONFIG = "configs/frontier.yaml"


def train_one(out_dir: Path, overrides: list[str], *, nice: int = 0) -> dict[str, Any]:
    """One in-process (`comm.name=local`) `dtrain train` of the frontier config; its summary plus curve."""
    cmd = [*(["nice", "-n", str(nice)] if nice else []), sys.executable, "-m", "dtrain.cli", "train", CONFIG,
           f"out_dir={out_dir}", "progress=false", "plot=false", "ckpt_every=0", "threads=1", *overrides]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(overrides)} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    summary = json.loads((out_dir / "summary.json").read_text())
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    summary["curve"] = [{"step": r["step"], "val_loss": r["eval"]} for r in rows if r.get("eval") is not None]
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="40 steps, sizes 4 and 16 (a smoke run)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[16, 32, 64, 128, 256], help="sequences per step")
    parser.add_argument("--steps", type=int, default=None, help="default: the config's steps")
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    sizes = [4, 16] if args.quick else args.sizes
    extra = ["steps=40", "eval_every=20", "workload.n_layer=1", "workload.d_model=32"] if args.quick else []
    if args.steps and not args.quick:
        extra.append(f"steps={args.steps}")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="dtrain-batch-") as tmp:
        def one(b: int) -> dict[str, Any]:
            overrides = ["comm.name=local", "comm.workers=1", "algo.name=none", f"workload.batch_size={b}", *extra]
            s = train_one(Path(tmp) / f"b{b}", overrides, nice=0 if args.quick else 10)
            print(f"[batch {b}] val {s['eval']['value']:.4f} ({s['wall_s']:.0f}s)", file=sys.stderr, flush=True)
            return s

        with ThreadPoolExecutor(args.parallel) as pool:
            summaries = list(pool.map(one, sorted(sizes, reverse=True)))[::-1]
    seq = load(REPO / CONFIG).workload.seq_len
    rows = []
    for b, s in zip(sorted(sizes), summaries):
        rows.append({"batch": b, "tokens": b * seq, "steps": s["steps"], "val_loss": s["eval"]["value"],
                     "wall_s": s["wall_s"], "curve": s["curve"]})
    by = {r["batch"]: r for r in rows}
    for r in rows:
        q = by.get(r["batch"] * 4)
        r["gain_4x"] = (r["val_loss"] - q["val_loss"]) / r["val_loss"] if q else None
        r["tokens_per_s"] = r["tokens"] * r["steps"] / r["wall_s"]
    text = table(rows, [("batch", "seqs/step"), ("tokens", "tokens/step"), ("steps", "steps"), ("val_loss", "val loss"),
                        ("gain_4x", "gain of 4x batch"), ("tokens_per_s", "tokens/s"), ("wall_s", "wall s")])
    text += (f"\n\none worker, {CONFIG} (model, AdamW, schedule as configured), loss at equal steps; 'gain of 4x batch' ="
             f" relative val-loss drop from this batch to 4x it. Wall {time.perf_counter() - t0:.0f}s.")
    write_outputs(args.out, {"config": CONFIG, "quick": args.quick, "rows": rows}, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
