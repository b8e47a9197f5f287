"""dtrain's DDP against torch's DistributedDataParallel: step time, interleaved in one run.

N gloo workers under torchrun (loopback, one torch thread each). At every model size each worker
builds the char_lm model twice from the same init: one wrapped in
``torch.nn.parallel.DistributedDataParallel`` (default buckets, overlapped with backward), one
hooked by ``dtrain.algorithms.DDP`` on a `TorchComm`. Both train on the same batches with the same
step: forward, backward, clip to 1.0, AdamW, zero_grad. They alternate in blocks of ``--block``
steps (the order flips every block, so drift on a shared machine hits both alike); the first
block of each is warm-up. Step times are rank 0's (DDP keeps ranks in lock-step). The ratio is the
median over block pairs of dtrain's mean step time over torch's, with the spread of those ratios.

    python benchmarks/ddp_speed.py [--quick] [--workers 4] [--sizes 4x128 4x256] [--out benchmarks/results/ddp_speed.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from common import REPO, free_port, table, write_outputs


def _worker(args: argparse.Namespace) -> None:
    from torch import nn

    from dtrain.algorithms import DDP
    from dtrain.comm.torch_backend import TorchComm
    from dtrain.workloads import char_lm

    torch.set_num_threads(1)
    comm = TorchComm()
    rows = []
    for size in args.sizes:
        n_layer, d_model = (int(v) for v in size.split("x"))
        cfg = char_lm.Config(n_layer=n_layer, d_model=d_model, n_head=4, seq_len=args.seq_len, batch_size=args.batch)
        work = char_lm.CharLM(cfg, seed=0)
        models = {"torch": work.build_model(), "dtrain": work.build_model()}
        opts = {k: torch.optim.AdamW(m.parameters(), lr=3e-3, weight_decay=0.1) for k, m in models.items()}
        hook = DDP(opts["dtrain"], comm)
        forward = {"torch": nn.parallel.DistributedDataParallel(models["torch"]), "dtrain": models["dtrain"]}
        times: dict[str, list[float]] = {"torch": [], "dtrain": []}
        step = 0
        for block in range(args.blocks + 1):
            for name in (("torch", "dtrain") if block % 2 == 0 else ("dtrain", "torch")):
                t0 = time.perf_counter()
                for i in range(args.block):
                    loss = work.loss(forward[name], work.train_batch(step + i, comm.rank, comm.world_size))
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(models[name].parameters(), 1.0, foreach=True)
                    opts[name].step()
                    opts[name].zero_grad(set_to_none=True)
                if block:  # block 0 is warm-up
                    times[name].append((time.perf_counter() - t0) / args.block)
            step += args.block
        diff = max((a - b).abs().max().item() for a, b in zip(models["torch"].parameters(), models["dtrain"].parameters()))
        ratios = [d / t for d, t in zip(times["dtrain"], times["torch"])]
        rows.append({"size": size, "params": sum(p.numel() for p in models["torch"].parameters()),
                     "torch_step_s": statistics.median(times["torch"]), "dtrain_step_s": statistics.median(times["dtrain"]),
                     "ratio": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
                     "blocks": len(ratios), "skipped_steps": hook.skipped_steps, "max_weight_diff": diff})
        hook.remove()
    if comm.rank == 0:
        Path(args.worker_out).write_text(json.dumps(rows))
    comm.close()


def main() -> int:
    import subprocess

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 workers, a 1x32 model, 2 blocks of 2 steps (a smoke run)")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--sizes", nargs="+", default=["4x128", "4x256"], help="n_layer x d_model of char_lm")
    parser.add_argument("--batch", type=int, default=16, help="sequences per worker per step")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--block", type=int, default=5, help="steps per timed block")
    parser.add_argument("--blocks", type=int, default=8, help="timed blocks per method (after one warm-up block)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(args)
        return 0
    if args.quick:
        args.workers, args.sizes, args.block, args.blocks, args.batch = 2, ["1x32"], 2, 2, 4
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="dtrain-ddp-speed-") as tmp:
        out = Path(tmp) / "rows.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(args.workers), "--master-addr",
               "127.0.0.1", "--master-port", str(free_port()), str(Path(__file__).resolve()), "--worker",
               "--worker-out", str(out), "--sizes", *args.sizes, "--batch", str(args.batch), "--seq-len", str(args.seq_len),
               "--block", str(args.block), "--blocks", str(args.blocks)]
        env = {**__import__("os").environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"ddp_speed workers failed ({proc.returncode}): {proc.stderr[-3000:]}")
        rows = json.loads(out.read_text())
    text = table(rows, [("size", "layers x d"), ("params", "params"), ("torch_step_s", "torch DDP s/step"),
                        ("dtrain_step_s", "dtrain DDP s/step"), ("ratio", "dtrain/torch"), ("ratio_min", "min"),
                        ("ratio_max", "max"), ("blocks", "block pairs"), ("max_weight_diff", "max |w diff|")])
    text += (f"\n\n{args.workers} gloo workers, char_lm, {args.batch}x{args.seq_len} bytes per worker per step, AdamW, "
             f"clip 1.0; blocks of {args.block} steps alternating (order flipped each block); ratio = median over block "
             f"pairs (min/max of the pairs beside it). Wall {time.perf_counter() - t0:.0f}s.")
    write_outputs(args.out, {"workers": args.workers, "batch": args.batch, "seq_len": args.seq_len, "block": args.block,
                             "quick": args.quick, "rows": rows}, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
