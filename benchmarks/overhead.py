"""Cost of the DiLoCo hook: time per inner step of a hooked loop vs a plain PyTorch loop.

    python benchmarks/overhead.py --out benchmarks/results/overhead.json
Same model, data and optimizer in one process; the two loops alternate in short blocks so machine
noise hits both alike, and the median per-step time of each is compared. The hook's outer step
(every H steps) is included, amortised, as a user would pay it; the network is not (one worker),
so this isolates what the hook adds to the user's loop.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from common import table, write_outputs
from dtrain.algorithms import DiLoCo
from dtrain.comm import LocalGroup
from dtrain.workloads.char_lm import CharLM, Config


def make(workload: CharLM, hooked: bool, sync_every: int):
    model = workload.build_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)
    if hooked:
        DiLoCo(opt, LocalGroup(1).comm(0), sync_every=sync_every)
    return model, opt


def block(workload: CharLM, model, opt, start: int, n: int) -> tuple[float, float]:
    """(thread CPU seconds, wall seconds) per step; CPU time is immune to other jobs on the machine."""
    c0, t0 = time.thread_time(), time.perf_counter()
    for step in range(start, start + n):
        loss = workload.loss(model, workload.train_batch(step, 0, 1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return (time.thread_time() - c0) / n, (time.perf_counter() - t0) / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--block", type=int, default=50, help="steps per block (a multiple of --sync-every keeps the outer step share fixed)")
    ap.add_argument("--sync-every", type=int, default=50)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.block, args.sync_every = 3, 10, 10
    torch.set_num_threads(args.threads)
    workload = CharLM(Config(), seed=0)
    plain, hooked = make(workload, False, args.sync_every), make(workload, True, args.sync_every)
    block(workload, *plain, 0, 5)  # warm-up both
    block(workload, *hooked, 0, 5)
    cpu: dict[str, list[float]] = {"plain": [], "diloco_hook": []}
    wall: dict[str, list[float]] = {"plain": [], "diloco_hook": []}
    for r in range(args.rounds):
        order = [("plain", plain), ("diloco_hook", hooked)]
        for name, (model, opt) in order if r % 2 == 0 else order[::-1]:
            c, w = block(workload, model, opt, r * args.block, args.block)
            cpu[name].append(c)
            wall[name].append(w)
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    med_wall = {k: statistics.median(v) for k, v in wall.items()}
    ratio = med_cpu["diloco_hook"] / med_cpu["plain"]
    rows = [{"loop": k, "cpu_ms": 1e3 * med_cpu[k], "cpu_ratio": med_cpu[k] / med_cpu["plain"],
             "wall_ms": 1e3 * med_wall[k], "wall_ratio": med_wall[k] / med_wall["plain"]} for k in cpu]
    text = table(rows, [("loop", "loop"), ("cpu_ms", "CPU ms/step"), ("cpu_ratio", "x plain"),
                        ("wall_ms", "wall ms/step"), ("wall_ratio", "x plain")])
    text += (f"\n\nhook overhead (thread CPU time, medians): {100 * (ratio - 1):+.2f}% (goal < 3%); "
             f"{args.rounds} rounds x {args.block} steps alternating, H = {args.sync_every}")
    write_outputs(args.out, {"median_cpu_s_per_step": med_cpu, "median_wall_s_per_step": med_wall, "ratio": ratio,
                             "cpu_samples": cpu, "wall_samples": wall, "sync_every": args.sync_every}, text)


if __name__ == "__main__":
    main()
