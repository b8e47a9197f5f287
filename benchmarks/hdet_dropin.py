"""HDET as a OneCycleLR drop-in: is `dtrain train configs/hdet.yaml` with HDET's defaults ever worse
than the same run with exploration off (which is OneCycleLR on every replica)?

Runs side by side, in one invocation, on the local backend (4 workers as threads), each system with
the same seeds:
- "HDET defaults": configs/hdet.yaml as it stands (replicas at 1 ± 0.2 × the OneCycle lr, averaged
  every 25 steps, the scale controller gated by the significance test at α = 0.05);
- "OneCycleLR (exploration off)": the same with algo.spread=0 algo.auto_lr=false algo.probe_batches=0
  (every replica on OneCycleLR's curve; the same averaging, so only the exploration differs);
- with --ungated, also the additive controller without the test (the library's earlier default form,
  algo.auto_lr_mode=additive algo.auto_lr_alpha=null), the form issue 14 reported.

Prints final val loss mean ± std over seeds per system and the gap to OneCycleLR, and writes JSON
(``--out``) plus the table beside it (.txt).

    .venv/bin/python benchmarks/hdet_dropin.py --out benchmarks/results/hdet_dropin.json   (8-15 min here, by load)
    .venv/bin/python benchmarks/hdet_dropin.py --quick                                      (tiny, < 1 min)
    .venv/bin/python benchmarks/hdet_dropin.py --set algo.spread=0.5                        (a wider spread)
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from dtrain.config import load
from dtrain.train import run

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "configs" / "hdet.yaml"
SYSTEMS = {
    "HDET defaults": [],
    "OneCycleLR (exploration off)": ["algo.spread=0", "algo.auto_lr=false", "algo.probe_batches=0"],
}
UNGATED = {"HDET additive, no test (issue 14's form)": ["algo.auto_lr_mode=additive", "algo.auto_lr_alpha=null"]}
QUICK = ["steps=40", "eval_every=40", "workload.n_layer=1", "workload.d_model=32", "workload.eval_batches=2",
         "algo.converge_every=5", "algo.auto_lr_warmup=5"]


def run_one(overrides: list[str], out_dir: Path) -> dict[str, Any]:
    cfg = load(CONFIG, ["comm.name=local", "comm.workers=4", "threads=1", "progress=false", "plot=false",
                        "ckpt_every=0", f"out_dir={out_dir}", *overrides])
    t0 = time.perf_counter()
    summary = run(cfg)
    assert summary is not None
    report = summary["workers"][0]["algorithm"]
    return {"val_loss": summary["eval"]["value"], "wall_s": time.perf_counter() - t0,
            "moved": report.get("moved"), "lr_scale": report.get("lr_scale"), "base_lr": report.get("base_lr"),
            "evidence": report.get("evidence"), "bytes_sent_per_worker": summary["comm"]["max"]["bytes_sent"]
            if "max" in summary["comm"] else None}


def table(rows: list[dict[str, Any]], reference: float) -> str:
    head = f"{'system':<44}{'val loss mean':>14}{'± std':>8}{'vs OneCycleLR':>15}   per seed"
    lines = [head, "-" * (len(head) + 20)]
    for r in rows:
        gap = 100 * (r["mean"] / reference - 1)
        seeds = ", ".join(f"{v:.4f}" for v in r["val_loss"])
        lines.append(f"{r['system']:<44}{r['mean']:>14.4f}{r['std']:>8.4f}{gap:>+14.2f}%   {seeds}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--quick", action="store_true", help="40 steps, a 1-layer model: checks that it runs")
    ap.add_argument("--ungated", action="store_true", help="also run the additive controller without the test")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="overrides for every system (e.g. algo.spread=0.5); exploration off still sets its own")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if len(args.seeds) < 2:
        ap.error("--seeds needs at least 2 seeds (the table reports mean ± std)")
    systems = {**SYSTEMS, **(UNGATED if args.ungated else {})}
    extra = QUICK if args.quick else []
    t_start, rows = time.perf_counter(), []
    with tempfile.TemporaryDirectory() as tmp:
        for name, overrides in systems.items():
            runs = []
            for seed in args.seeds:
                out = Path(tmp) / f"{len(rows)}_{seed}"
                runs.append(run_one([*extra, *args.set, *overrides, f"seed={seed}"], out))
                print(f"  {name:<44} seed {seed}: val_loss {runs[-1]['val_loss']:.4f} ({runs[-1]['wall_s']:.0f}s)"
                      f"{'  controller moved' if runs[-1]['moved'] else ''}", flush=True)
            values = [r["val_loss"] for r in runs]
            rows.append({"system": name, "overrides": overrides, "val_loss": values, "mean": statistics.mean(values),
                         "std": statistics.stdev(values), "runs": runs})
    reference = next(r for r in rows if r["system"].startswith("OneCycleLR"))["mean"]
    text = table(rows, reference)
    notes = (f"dtrain train {CONFIG.relative_to(REPO)} on comm.name=local comm.workers=4 threads=1, seeds {args.seeds}"
             f"{', quick: ' + ' '.join(QUICK) if args.quick else ''}{', set: ' + ' '.join(args.set) if args.set else ''}. OneCycleLR (exploration off) = the same run "
             f"with {' '.join(SYSTEMS['OneCycleLR (exploration off)'])}. Total {time.perf_counter() - t_start:.0f}s.")
    report = text + "\n\n" + notes
    print("\n" + report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"config": str(CONFIG.relative_to(REPO)), "seeds": args.seeds, "quick": args.quick,
                                        "set": args.set,
                                        "rows": rows, "notes": notes}, indent=1, default=str))
        args.out.with_suffix(".txt").write_text(report + "\n")


if __name__ == "__main__":
    main()
