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

so that optimizer = DiLoCo SGD - DiLoCo and gossip = NoLoCo - DiLoCo SGD. One seed per point (the
frontier's DiLoCo and NoLoCo points are its cached runs).

    python benchmarks/noloco_gap.py [--quick] [--h 30 100] [--cache runs/frontier_cache/full] [--out ...]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common import table, write_outputs
from frontier_runs import DEFAULT_HP, Run, Runner

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
            ("NoLoCo Nesterov", "noloco", DEFAULT_HP["diloco"], ("algo.nesterov=true",)),
            ("NoLoCo Nesterov γ1.0", "noloco", DEFAULT_HP["diloco"], ("algo.nesterov=true", "algo.gamma=1.0"))]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a 1x32 model, 2 workers, 40 steps, H=10 (smoke run)")
    p.add_argument("--h", type=int, nargs="+", default=[30, 100])
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", type=Path, default=Path("runs/frontier_cache/full"))
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    workers, steps, hs, extra = (2, 40, [10], QUICK) if args.quick else (4, args.steps, args.h, ())
    runner = Runner(cache=None if args.quick else args.cache, nice=0 if args.quick else 10, in_process=args.quick)
    rows = []
    for h in hs:
        got = {}
        for label, method, hp, more in variants():
            run = Run(method, h, tuple(sorted(hp.items())), workers=workers, seed=args.seed, steps=steps, batch=args.batch,
                      extra=(*extra, *more))
            got[label] = runner.one(run)
            rows.append({"H": h, "variant": label, "val_loss": got[label]["val_loss"],
                         "val_loss_spread": got[label]["val_loss_spread"],
                         "bytes_sent_per_worker": got[label]["bytes_sent_per_worker"],
                         "vs_diloco_pct": 100 * (got[label]["val_loss"] / got["DiLoCo"]["val_loss"] - 1)})
        base, sgd, gossip, nesterov = (got[k]["val_loss"] for k in ("DiLoCo", "DiLoCo SGD", "NoLoCo", "NoLoCo Nesterov"))
        next(r for r in rows if r["H"] == h and r["variant"] == "NoLoCo")["split"] = {
            "optimizer_pct": 100 * (sgd / base - 1), "gossip_pct": 100 * (gossip / sgd - 1),
            "nesterov_gossip_pct": 100 * (nesterov / base - 1)}
    text = table(rows, [("H", "H"), ("variant", "variant"), ("val_loss", "val loss"), ("vs_diloco_pct", "vs DiLoCo %"),
                        ("val_loss_spread", "worker spread"), ("bytes_sent_per_worker", "bytes/worker")])
    for r in rows:
        if "split" in r:
            text += (f"\nH={r['H']}: NoLoCo - DiLoCo = {r['vs_diloco_pct']:+.2f}%: outer optimizer (SGD m0.5 vs Nesterov "
                     f"m0.9, both all-reduced) {r['split']['optimizer_pct']:+.2f}%, pair gossip instead of the all-reduce "
                     f"(same optimizer) {r['split']['gossip_pct']:+.2f}%; with DiLoCo's optimizer (NoLoCo Nesterov) the "
                     f"gossip costs {r['split']['nesterov_gossip_pct']:+.2f}%")
    text += (f"\n\n{workers} workers, {steps} steps, {args.batch} sequences per worker, seed {args.seed}; val loss = mean "
             "over workers of their own model's final validation loss; worker spread = max - min of those.")
    write_outputs(args.out, {"quick": args.quick, "steps": steps, "workers": workers, "rows": rows}, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
