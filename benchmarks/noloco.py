"""DDP vs DiLoCo vs NoLoCo on char_lm, 4 workers under torchrun (gloo, loopback), side by side.

Scenarios:
  plain     all workers at full speed;
  straggler one worker (rank 3) runs at half speed: it sleeps, before each batch, as long as the
            median of its own recent step times (a workload wrapper registered only here);
            NoLoCo runs with a straggler timeout (``--timeout``) so its fast workers stop waiting;
  int8      NoLoCo with the int8 per-block-scale exchange, against NoLoCo fp32 from `plain`.

Every number comes from the runs' summary.json (the backend's own counters). Blocked seconds for
`straggler` are the mean over the fast workers. The char_lm model is shrunk (2 layers, d=64) so the
whole comparison fits a 2-core machine; steps, inner AdamW and its schedule are the same for all.

    python benchmarks/noloco.py [--quick] [--out benchmarks/results/noloco.json]
    (internal) torchrun ... benchmarks/noloco.py --worker CONFIG key=value ...
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import torchrun_train
from dtrain.workloads import char_lm

MODEL = ["workload.n_layer=2", "workload.d_model=64", "workload.n_head=4", "threads=1", "progress=false",
         "plot=false", "ckpt_every=0"]
CONFIGS = {"ddp": "configs/ddp.yaml", "diloco": "configs/diloco.yaml", "noloco": "configs/noloco.yaml"}
SLOW_RANK = 3


# -- the straggler: a workload wrapper that exists only inside this benchmark's workers -------------
@dataclass
class Config(char_lm.Config):
    name: str = "slow_char_lm"
    slow_rank: int = -1
    slow_factor: float = 1.0  # 2.0 = the slow rank takes twice as long per step


def validate(cfg: Config) -> None:
    char_lm.validate(cfg)
    if cfg.slow_factor < 1:
        raise ValueError(f"workload.slow_factor must be >= 1, got {cfg.slow_factor}")


class SlowCharLM(char_lm.CharLM):
    def __init__(self, cfg: Config, *, seed: int) -> None:
        super().__init__(cfg, seed=seed)
        self._last: float | None = None
        self._intervals: list[float] = []

    def train_batch(self, step: int, rank: int, world_size: int) -> Any:
        now = time.perf_counter()
        if rank == self.cfg.slow_rank and self._last is not None:
            # the median ignores eval and outer-step outliers, so the slowdown tracks compute
            self._intervals = [*self._intervals[-20:], now - self._last]
            time.sleep((self.cfg.slow_factor - 1) * statistics.median(self._intervals))
            now = time.perf_counter()
        self._last = now
        return super().train_batch(step, rank, world_size)


def build(cfg: Config, *, seed: int) -> SlowCharLM:
    return SlowCharLM(cfg, seed=seed)


def worker_main(argv: list[str]) -> int:
    """The torchrun entry point: `dtrain train` with the straggler workload registered."""
    from dtrain import config as dconfig
    from dtrain.cli import main

    dconfig.register_workload("slow_char_lm", __name__)
    return main(["train", *argv])


# -- the driver ---------------------------------------------------------------------------------
def metrics(summary: dict[str, Any], *, slow_rank: int | None = None) -> dict[str, Any]:
    workers = sorted(summary["workers"], key=lambda w: w["rank"])
    fast = [w for w in workers if w["rank"] != slow_rank]
    rounds = workers[0]["algorithm"].get("outer_syncs")
    sent = statistics.mean(w["comm"]["bytes_sent"] for w in workers)
    return {
        "val_loss_rank0": summary["eval"]["value"],
        "val_loss": summary["eval"]["mean_over_workers"],  # NoLoCo's replicas differ: judge all of them
        "bytes_sent_per_worker": sent,
        "bytes_per_outer_step": sent / rounds if rounds else None,
        "collectives": max(w["comm"]["collectives"] for w in workers),
        "blocked_s_fast_mean": statistics.mean(w["comm"]["blocked_s"] for w in fast),
        "blocked_s_max": max(w["comm"]["blocked_s"] for w in workers),
        "wall_s": max(w["wall_s"] for w in workers),
        "algorithm": workers[0]["algorithm"],
    }


def runs(args: argparse.Namespace) -> list[tuple[str, str, list[str], int | None]]:
    slow = ["workload.name=slow_char_lm", f"workload.slow_rank={SLOW_RANK}", "workload.slow_factor=2"]
    return [
        ("plain", "ddp", [], None),
        ("plain", "diloco", [], None),
        ("plain", "noloco", [], None),
        ("straggler", "diloco", slow, SLOW_RANK),
        ("straggler", "noloco", [*slow, f"algo.timeout_s={args.timeout}"], SLOW_RANK),
        ("int8", "noloco", ["algo.compression=int8"], None),
    ]


def table(results: list[dict[str, Any]]) -> str:
    ddp_wall = next((r["wall_s"] for r in results if r["algo"] == "ddp"), None)
    lines = [f"{'scenario':<10} {'algorithm':<8} {'val_loss':>8} {'vs DiLoCo':>9} {'MB sent/wkr':>11} {'KB/outer':>9} "
             f"{'coll.':>6} {'blocked s':>9} {'vs DiLoCo':>9} {'wall s':>7} {'vs DDP':>7}"]
    for r in results:
        ref = next((x for x in results if x["scenario"] == r["scenario"] and x["algo"] == "diloco"), None)
        ref = ref or next(x for x in results if x["scenario"] == "plain" and x["algo"] == "diloco")
        per_outer = f"{r['bytes_per_outer_step'] / 1e3:9.1f}" if r["bytes_per_outer_step"] else f"{'-':>9}"
        blocked_ratio = r["blocked_s_fast_mean"] / ref["blocked_s_fast_mean"] if ref["blocked_s_fast_mean"] else float("nan")
        lines.append(
            f"{r['scenario']:<10} {r['algo']:<8} {r['val_loss']:8.4f} {r['val_loss'] / ref['val_loss']:9.3f} "
            f"{r['bytes_sent_per_worker'] / 1e6:11.2f} {per_outer} {r['collectives']:6d} {r['blocked_s_fast_mean']:9.2f} "
            f"{blocked_ratio:9.2f} {r['wall_s']:7.1f} {r['wall_s'] / ddp_wall if ddp_wall else float('nan'):7.2f}"
        )
    return "\n".join(lines)


def checks(results: list[dict[str, Any]]) -> list[tuple[str, bool, str]]:
    get = {(r["scenario"], r["algo"]): r for r in results}
    out = []
    d, n = get[("plain", "diloco")], get[("plain", "noloco")]
    rel = n["val_loss"] / d["val_loss"] - 1
    out.append(("NoLoCo val loss within 2% of DiLoCo", abs(rel) <= 0.02 or rel < 0, f"{rel:+.2%}"))
    sd, sn = get[("straggler", "diloco")], get[("straggler", "noloco")]
    ratio = sn["blocked_s_fast_mean"] / max(sd["blocked_s_fast_mean"], 1e-9)
    out.append(("straggler: fast workers' blocked time NoLoCo <= 0.5x DiLoCo", ratio <= 0.5, f"{ratio:.2f}x"))
    q = get[("int8", "noloco")]
    bratio = q["bytes_per_outer_step"] / n["bytes_per_outer_step"]
    out.append(("int8: bytes per outer step <= 0.3x fp32", bratio <= 0.3, f"{bratio:.3f}x"))
    lrel = q["val_loss"] / n["val_loss"] - 1
    out.append(("int8: val loss within 1% of fp32 exchange", abs(lrel) <= 0.01, f"{lrel:+.2%}"))
    out.append(("NoLoCo issues no collective while training", all(r["collectives"] == 0 for r in results if r["algo"] == "noloco"), ""))
    return out


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        return worker_main(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="100 steps, H=20 (a smoke run, numbers not meaningful)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--timeout", type=float, default=1.0, help="NoLoCo's straggler timeout (algo.timeout_s) in `straggler`")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args()
    steps = 100 if args.quick else args.steps
    common = [*MODEL, f"steps={steps}", f"eval_every={steps}"]
    results = []
    with tempfile.TemporaryDirectory(prefix="dtrain-bench-noloco-") as tmp:
        for i, (scenario, algo, extra, slow) in enumerate(runs(args)):
            h = ["algo.sync_every=20"] if args.quick and algo != "ddp" else []
            t0 = time.perf_counter()
            summary = torchrun_train(args.workers, CONFIGS[algo], Path(tmp) / f"{i}-{scenario}-{algo}", [*common, *h, *extra],
                                     entry=[str(Path(__file__).resolve()), "--worker"])
            row = {"scenario": scenario, "algo": algo, "overrides": [*h, *extra], **metrics(summary, slow_rank=slow)}
            results.append(row)
            print(f"[{scenario}/{algo}] val_loss {row['val_loss']:.4f}, blocked {row['blocked_s_fast_mean']:.2f}s, "
                  f"{time.perf_counter() - t0:.0f}s", file=sys.stderr, flush=True)
    text = table(results)
    verdicts = checks(results)
    text += "\n\n" + "\n".join(f"[{'PASS' if ok else 'FAIL'}] {name} {detail}" for name, ok, detail in verdicts)
    h = 20 if args.quick else 50
    text += (f"\n\n{args.workers} workers, {steps} steps, char_lm (2 layers, d=64), inner AdamW (same for all); DiLoCo H={h} "
             f"Nesterov lr 0.7 momentum 0.9; NoLoCo H={h} beta 0.7 alpha 0.5 gamma 0.7 pairs; straggler = rank {SLOW_RANK} "
             f"at half speed, NoLoCo timeout {args.timeout}s; blocked s = mean over the fast workers.")
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"steps": steps, "workers": args.workers, "results": results,
                                        "checks": [{"check": c, "pass": ok, "value": v} for c, ok, v in verdicts]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
