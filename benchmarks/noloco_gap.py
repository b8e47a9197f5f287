"""Why NoLoCo trails DiLoCo on the frontier workload: the gap split into its outer optimizer and its gossip.

NoLoCo's outer step differs from DiLoCo's in two ways at once: its optimizer (SGD, momentum 0.5, no
Nesterov, as in the NoLoCo paper; DiLoCo's is Nesterov with momentum 0.9) and its averaging (each
worker averages with one partner, not with all). This benchmark runs, at each H, in the small regime
of benchmarks/frontier.py (4 workers, 16 sequences per worker, 1,500 steps, the same runs cache):

  DiLoCo        Nesterov, outer lr 0.7, momentum 0.9 (our default; the DiLoCo paper's)
  DiLoCo m0.3   Nesterov, outer lr 0.7, momentum 0.3 (the DiLoCo baseline of the NoLoCo paper)
  DiLoCo SGD    outer SGD, lr 0.7, momentum 0.5, no Nesterov: NoLoCo's optimizer over an all-reduce
  NoLoCo        pairs, outer lr 0.7, momentum 0.5, gamma = outer lr (the NoLoCo paper's defaults)
  NoLoCo m0.9   pairs, outer lr 0.7, momentum 0.9, gamma 1.0 (DiLoCo's momentum; pairs need alpha < gamma)
  NoLoCo Nesterov  pairs with DiLoCo's optimizer (Nesterov, lr 0.7, momentum 0.9; algo.nesterov=true), gamma 0.7
  NoLoCo Nesterov γ1.0  the same with a stronger pull to the partner's φ (gamma 1.0)

  NoLoCo Nesterov γ0.5 / γ0.3  weaker pulls

so that optimizer = DiLoCo SGD - DiLoCo and gossip = NoLoCo - DiLoCo SGD; one seed (--seed) per variant.
Then the outer lr, swept alike for DiLoCo and for NoLoCo Nesterov (Nesterov, momentum 0.9, gamma 0.7)
over --outer-lrs, a winner at an edge of the grid extending it one geometric step at a time (twice at
most), and each method's winner run again on every seed of --seeds: the gap that decides the goal
(NoLoCo <= DiLoCo + 0.5 % at the same H) is the one between the two methods' tuned outer steps, mean
over seeds.

    python benchmarks/noloco_gap.py [--quick] [--h 30 100] [--seeds 0 1] [--cache runs/frontier_cache/full] [--out ...]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from common import table, write_outputs
from frontier_runs import DEFAULT_HP, Run, Runner, seed_stats

QUICK = ("workload.n_layer=1", "workload.d_model=32", "workload.n_head=2", "workload.seq_len=32", "workload.eval_batches=2",
         "workload.eval_batch_size=8", "optim.warmup_steps=4")


def variants() -> list[tuple[str, str, dict[str, float], tuple[str, ...]]]:
    """(label, method, hyperparameters, extra overrides)."""
    lr = DEFAULT_HP["diloco"]["lr"]
    return [("DiLoCo", "diloco", DEFAULT_HP["diloco"], ()),
            ("DiLoCo m0.3", "diloco", {"lr": lr, "outer_lr": 0.7, "outer_momentum": 0.3}, ()),
            ("DiLoCo SGD", "diloco", {"lr": lr, **{k: DEFAULT_HP["noloco"][k] for k in ("outer_lr", "outer_momentum")}},
             ("algo.nesterov=false",)),
            ("NoLoCo", "noloco", DEFAULT_HP["noloco"], ()),
            # what would close it: DiLoCo's momentum on NoLoCo (stability for pairs needs alpha < gamma)
            ("NoLoCo m0.9", "noloco", {"lr": lr, "outer_lr": 0.7, "outer_momentum": 0.9}, ("algo.gamma=1.0",)),
            # DiLoCo's own optimizer over the pair's means: Nesterov, lr 0.7, momentum 0.9, gamma = outer lr
            ("NoLoCo Nesterov", "noloco", DEFAULT_HP["diloco"], ("algo.nesterov=true", "algo.gamma=0.7")),
            ("NoLoCo Nesterov γ1.0", "noloco", DEFAULT_HP["diloco"], ("algo.nesterov=true", "algo.gamma=1.0")),
            ("NoLoCo Nesterov γ0.5", "noloco", DEFAULT_HP["diloco"], ("algo.nesterov=true", "algo.gamma=0.5")),
            ("NoLoCo Nesterov γ0.3", "noloco", DEFAULT_HP["diloco"], ("algo.nesterov=true", "algo.gamma=0.3"))]


# the outer-lr sweep: (label, method, extra overrides); gamma stays 0.7 while NoLoCo's outer lr moves
SWEPT = (("DiLoCo", "diloco", ()), ("NoLoCo Nesterov", "noloco", ("algo.nesterov=true", "algo.gamma=0.7")))


def sweep_outer_lr(runner: Runner, make: Callable[[float], Run], grid: list[float], *,
                   max_extensions: int = 2) -> dict[float, float]:
    """outer lr -> val loss on the grid, extended by one geometric step past an edge that wins (at most
    ``max_extensions`` times)."""
    grid = sorted(grid)
    losses = dict(zip(grid, (r["val_loss"] for r in runner.many(make(lr) for lr in grid))))
    for _ in range(max_extensions):
        best = min(losses, key=losses.get)
        lrs = sorted(losses)
        if len(lrs) < 2 or best not in (lrs[0], lrs[-1]):
            break
        inner_neighbour = lrs[1] if best == lrs[0] else lrs[-2]
        nxt = round(best * best / inner_neighbour, 3)  # one geometric step outward
        losses[nxt] = runner.one(make(nxt))["val_loss"]
    return dict(sorted(losses.items()))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a 1x32 model, 2 workers, 40 steps, H=10 (smoke run)")
    p.add_argument("--h", type=int, nargs="+", default=[30, 100])
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seed", type=int, default=0, help="the seed of the variants and of the sweep")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="the seeds each method's tuned outer lr runs on")
    p.add_argument("--outer-lrs", type=float, nargs="+", default=[0.5, 0.7, 1.0, 1.3])
    p.add_argument("--parallel", type=int, default=2, help="runs at a time")
    p.add_argument("--cache", type=Path, default=Path("runs/frontier_cache/full"))
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    workers, steps, hs, extra = (2, 40, [10], QUICK) if args.quick else (4, args.steps, args.h, ())
    grid = [0.5, 1.0] if args.quick else args.outer_lrs
    seeds = [args.seed] if args.quick else args.seeds
    runner = Runner(cache=None if args.quick else args.cache, nice=0 if args.quick else 10, in_process=args.quick,
                    parallel=args.parallel)

    def make(method: str, h: int, hp: dict[str, float], more: tuple[str, ...], seed: int) -> Run:
        return Run(method, h, tuple(sorted(hp.items())), workers=workers, seed=seed, steps=steps, batch=args.batch,
                   extra=(*extra, *more))

    rows, sweep, tuned = [], [], []
    for h in hs:
        results = runner.many(make(method, h, hp, more, args.seed) for _, method, hp, more in variants())
        got = {label: r for (label, *_), r in zip(variants(), results)}
        for label, r in got.items():
            rows.append({"H": h, "variant": label, "val_loss": r["val_loss"], "val_loss_spread": r["val_loss_spread"],
                         "bytes_sent_per_worker": r["bytes_sent_per_worker"],
                         "vs_diloco_pct": 100 * (r["val_loss"] / got["DiLoCo"]["val_loss"] - 1)})
        base, sgd, gossip, nesterov = (got[k]["val_loss"] for k in ("DiLoCo", "DiLoCo SGD", "NoLoCo", "NoLoCo Nesterov"))
        next(r for r in rows if r["H"] == h and r["variant"] == "NoLoCo")["split"] = {
            "optimizer_pct": 100 * (sgd / base - 1), "gossip_pct": 100 * (gossip / sgd - 1),
            "nesterov_gossip_pct": 100 * (nesterov / base - 1)}
        for label, method, more in SWEPT:
            def at(lr: float, seed: int = args.seed, method: str = method, more: tuple[str, ...] = more) -> Run:
                return make(method, h, {**DEFAULT_HP["diloco"], "outer_lr": lr}, more, seed)

            losses = sweep_outer_lr(runner, at, grid, max_extensions=0 if args.quick else 2)
            sweep += [{"H": h, "method": label, "outer_lr": lr, "val_loss": v} for lr, v in losses.items()]
            best = min(losses, key=losses.get)
            per_seed = [r["val_loss"] for r in runner.many(at(best, s) for s in seeds)]
            mean, std = seed_stats(per_seed)
            tuned.append({"H": h, "method": label, "outer_lr": best, "seeds": len(seeds), "val_loss": mean,
                          "val_loss_std": std, "per_seed": per_seed})
        diloco, noloco = tuned[-2], tuned[-1]
        noloco["vs_diloco_pct"] = 100 * (noloco["val_loss"] / diloco["val_loss"] - 1)
        noloco["vs_diloco_pct_per_seed"] = [100 * (n / d - 1) for n, d in zip(noloco["per_seed"], diloco["per_seed"])]
    text = table(rows, [("H", "H"), ("variant", "variant"), ("val_loss", "val loss"), ("vs_diloco_pct", "vs DiLoCo %"),
                        ("val_loss_spread", "worker spread"), ("bytes_sent_per_worker", "bytes/worker")])
    for r in rows:
        if "split" in r:
            text += (f"\nH={r['H']}: NoLoCo - DiLoCo = {r['vs_diloco_pct']:+.2f}%: outer optimizer (SGD m0.5 vs Nesterov "
                     f"m0.9, both all-reduced) {r['split']['optimizer_pct']:+.2f}%, pair gossip instead of the all-reduce "
                     f"(same optimizer) {r['split']['gossip_pct']:+.2f}%; with DiLoCo's optimizer (NoLoCo Nesterov) the "
                     f"gossip costs {r['split']['nesterov_gossip_pct']:+.2f}%")
    text += (f"\n\nOuter lr swept alike (Nesterov, momentum 0.9; NoLoCo gamma 0.7), seed {args.seed}:\n"
             + table(sweep, [("H", "H"), ("method", "method"), ("outer_lr", "outer lr"), ("val_loss", "val loss")]))
    text += ("\n\nEach method at its best outer lr, every seed (mean; std over seeds):\n"
             + table(tuned, [("H", "H"), ("method", "method"), ("outer_lr", "outer lr"), ("seeds", "seeds"),
                             ("val_loss", "val loss"), ("val_loss_std", "std"), ("vs_diloco_pct", "vs DiLoCo %")]))
    text += (f"\n\n{workers} workers, {steps} steps, {args.batch} sequences per worker; val loss = mean "
             "over workers of their own model's final validation loss; worker spread = max - min of those.")
    write_outputs(args.out, {"quick": args.quick, "steps": steps, "workers": workers, "seeds": seeds, "rows": rows,
                             "outer_lr_sweep": sweep, "tuned": tuned}, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
