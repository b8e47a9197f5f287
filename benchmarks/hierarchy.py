"""Hierarchical workers over emulated WAN links: 2 sites x 2 processes (launchers/wan.py; needs root).

Each site is a network namespace behind a shaped link (--rate, --delay-ms one-way between sites);
a site's processes reach each other over loopback. Every system runs the same global batch per
step (32 sequences: 8 per process on 4 processes, or 16 per process on 2) on char_lm:

- ``ddp/flat``: gradient mean over all 4 processes every step, blind to the sites (4 workers);
- ``ddp/fsdp``: FSDP2 inside a site, gradient mean across the 2 sites every step on shards (HSDP-like);
- ``diloco/fsdp``: FSDP2 inside a site, DiLoCo across sites every H steps on shards;
- ``diloco/unsharded``: 1 process per site holding the whole model, same DiLoCo (same trajectory
  as ``diloco/fsdp``: a worker's batch does not depend on how many processes share it).

Reported per system: outer bytes sent per process and per site (slow links), inner bytes per
process (loopback), outer bytes per process per outer step and its ratio to the un-sharded run's
(the 1/k claim), training time to the target validation loss (evaluation excluded) and its ratio
to ``ddp/flat``. Runs stop at the target (``stop_at_target``); seeds are repeated.

    python benchmarks/hierarchy.py [--quick] [--out benchmarks/results/hierarchy.json]
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
sys.path.insert(0, str(REPO / "benchmarks"))
from common import table, write_outputs  # noqa: E402

MODEL = ["workload.n_layer=2", "workload.d_model=64", "workload.n_head=4", "threads=1", "progress=false", "plot=false",
         "ckpt_every=0"]
FSDP = ["comm.inner_size=2", "parallel.inner=fsdp", "workload.batch_size=16"]
# (name, config, processes per site, overrides)
SYSTEMS = [
    ("ddp/flat", "configs/ddp.yaml", 2, ["workload.batch_size=8"]),
    ("ddp/fsdp", "configs/ddp.yaml", 2, FSDP),
    ("diloco/fsdp", "configs/diloco.yaml", 2, FSDP),
    ("diloco/unsharded", "configs/diloco.yaml", 1, ["workload.batch_size=16"]),
]


def run_wan(sites: int, per_site: int, rate: str, delay_ms: float, config: str, out_dir: Path, overrides: list[str]) -> dict[str, Any]:
    cmd = [sys.executable, str(REPO / "launchers" / "wan.py"), "--workers", str(sites), "--inner-size", str(per_site),
           "--rate", rate, "--delay-ms", str(delay_ms), "--", config, f"out_dir={out_dir}", *overrides]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        said = [ln for ln in proc.stderr.splitlines() if "dtrain: error" in ln or "Error:" in ln]
        raise RuntimeError(f"{config} {overrides} failed ({proc.returncode}): {' | '.join(said[:4]) or proc.stderr[-2000:]}")
    return json.loads((out_dir / "summary.json").read_text())


def row(name: str, seed: int, per_site: int, s: dict[str, Any]) -> dict[str, Any]:
    workers = s["workers"]
    outer = statistics.mean(w["comm"]["bytes_sent"] for w in workers)
    syncs = workers[0]["algorithm"].get("outer_syncs")
    k = s.get("hierarchy", {}).get("inner_size", 1)
    return {
        "system": name, "seed": seed, "processes": len(workers) * k if "hierarchy" in s else len(workers),
        "val_loss": s["eval"]["value"], "reached": s["reached_target"], "time_to_target_s": s["time_to_target_s"],
        "train_time_s": s["train_time_s"], "steps_run": s["steps"] if not s["reached_target"] else None,
        "outer_bytes_per_process": outer, "outer_bytes_per_site": outer * per_site,
        "outer_syncs": syncs, "outer_bytes_per_process_per_sync": outer / syncs if syncs else None,
        "inner_bytes_per_process": (statistics.mean(w["comm_inner"]["bytes_sent"] for w in workers)
                                    if "comm_inner" in s else 0.0),
        "blocked_s": statistics.mean(w["comm"]["blocked_s"] for w in workers),
    }


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean ± std over seeds per system, with ratios to ddp/flat (time) and diloco/unsharded (bytes)."""
    out = []
    for name, *_ in SYSTEMS:
        mine = [r for r in rows if r["system"] == name]
        if not mine:
            continue
        ttt = [r["time_to_target_s"] for r in mine]
        agg: dict[str, Any] = {"system": name, "seeds": len(mine), "reached": sum(r["reached"] for r in mine)}
        for key in ("time_to_target_s", "outer_bytes_per_process", "outer_bytes_per_site", "inner_bytes_per_process",
                    "outer_bytes_per_process_per_sync", "val_loss", "blocked_s"):
            vals = [r[key] for r in mine if r[key] is not None]
            agg[key] = statistics.mean(vals) if vals and (key != "time_to_target_s" or None not in ttt) else None
            agg[key + "_std"] = statistics.stdev(vals) if len(vals) > 1 and agg[key] is not None else 0.0
        out.append(agg)
    base = next((a for a in out if a["system"] == "ddp/flat"), None)
    unsharded = next((a for a in out if a["system"] == "diloco/unsharded"), None)
    for a in out:
        a["time_vs_ddp_flat"] = (a["time_to_target_s"] / base["time_to_target_s"]
                                 if base and a["time_to_target_s"] and base["time_to_target_s"] else None)
        per_sync, ref = a["outer_bytes_per_process_per_sync"], unsharded and unsharded["outer_bytes_per_process_per_sync"]
        a["outer_per_process_vs_unsharded"] = per_sync / ref if per_sync and ref and a["system"].startswith("diloco") else None
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="4 steps, H=2, diloco/fsdp only, bandwidth only (smoke run)")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--sync-every", type=int, default=20, help="DiLoCo's H")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--rate", default="100mbit")
    parser.add_argument("--delay-ms", type=float, default=50.0)
    parser.add_argument("--target", type=float, default=2.7, help="char_lm val_loss target")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    steps, h, seeds, delay = (4, 2, 1, 0.0) if args.quick else (args.steps, args.sync_every, args.seeds, args.delay_ms)
    systems = [s for s in SYSTEMS if s[0] == "diloco/fsdp"] if args.quick else SYSTEMS
    common = [*MODEL, f"steps={steps}", f"eval_every={4 if args.quick else 25}", f"workload.target={args.target}",
              "stop_at_target=true"]
    rows = []
    with tempfile.TemporaryDirectory(prefix="dtrain-bench-hierarchy-") as tmp:
        for seed in range(seeds):
            for i, (name, config, per_site, extra) in enumerate(systems):
                sync = [f"algo.sync_every={h}"] if name.startswith("diloco") else []
                t0 = time.perf_counter()
                summary = run_wan(2, per_site, args.rate, delay, config, Path(tmp) / f"{seed}-{i}",
                                  [*common, f"seed={seed}", *sync, *extra])
                rows.append(row(name, seed, per_site, summary))
                print(f"[seed {seed} {name}] {time.perf_counter() - t0:.0f}s", file=sys.stderr, flush=True)
    agg = summarize(rows)
    cols = [("system", "system"), ("reached", "reached"), ("time_to_target_s", "to target s"),
            ("time_to_target_s_std", "±"), ("time_vs_ddp_flat", "vs ddp/flat"),
            ("outer_bytes_per_process", "outer B/proc"), ("outer_bytes_per_site", "outer B/site"),
            ("outer_bytes_per_process_per_sync", "outer B/proc/sync"), ("outer_per_process_vs_unsharded", "vs unsharded"),
            ("inner_bytes_per_process", "inner B/proc"), ("val_loss", "val_loss")]
    text = (f"# python benchmarks/hierarchy.py{' --quick' if args.quick else ''} (root; 2 sites x {args.rate}"
            f"{f' + {delay:g} ms' if delay else ''}; {seeds} seed(s); {steps} steps; DiLoCo H={h}; target val_loss "
            f"{args.target}; runs stop at the target)\n" + table(agg, cols) +
            "\nouter = slow links between sites (per process; a site sends per-process x its processes); "
            "inner = loopback inside a site.\nchar_lm 2 layers d=64, global batch 32 per step, inner AdamW, "
            "times are training time to the first eval at or below the target.")
    write_outputs(args.out, {"args": vars(args), "rows": rows, "summary": agg}, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
