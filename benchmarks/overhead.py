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


def block(workload: CharLM, model, opt, start: int, n: int) -> float:
    t0 = time.perf_counter()
    for step in range(start, start + n):
        loss = workload.loss(model, workload.train_batch(step, 0, 1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return (time.perf_counter() - t0) / n


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
    times: dict[str, list[float]] = {"plain": [], "diloco_hook": []}
    for r in range(args.rounds):
        order = [("plain", plain), ("diloco_hook", hooked)]
        for name, (model, opt) in order if r % 2 == 0 else order[::-1]:
            times[name].append(block(workload, model, opt, r * args.block, args.block))
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["diloco_hook"] / med["plain"]
    rows = [{"loop": k, "ms_per_step": 1e3 * med[k], "ratio": med[k] / med["plain"]} for k in times]
    text = table(rows, [("loop", "loop"), ("ms_per_step", "median ms/step"), ("ratio", "x plain")])
    text += f"\n\nhook overhead: {100 * (ratio - 1):+.2f}% (goal < 3%); {args.rounds} rounds x {args.block} steps, H = {args.sync_every}"
    write_outputs(args.out, {"median_s_per_step": med, "ratio": ratio, "samples": times, "sync_every": args.sync_every}, text)


if __name__ == "__main__":
    main()
