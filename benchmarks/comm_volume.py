"""DDP vs DiLoCo on char_lm, same workers and steps: bytes, collectives, blocked time, final loss.

    python benchmarks/comm_volume.py --out benchmarks/results/comm_volume.json
DiLoCo's bytes per worker should be about DDP's divided by H (sync_every).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from common import table, torchrun_train, write_outputs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--sync-every", type=int, default=50)
    ap.add_argument("--out", default=None)
    ap.add_argument("--quick", action="store_true", help="40 steps, H=10, a 1-layer model")
    args = ap.parse_args()
    steps, h = (40, 10) if args.quick else (args.steps, args.sync_every)
    common = [f"steps={steps}", f"eval_every={steps}", "ckpt_every=0"] + (["workload.n_layer=1"] if args.quick else [])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, config, extra in (("ddp", "configs/ddp.yaml", []), ("diloco", "configs/diloco.yaml", [f"algo.sync_every={h}"])):
            s = torchrun_train(args.workers, config, Path(tmp) / name, common + extra)
            mx = s["comm"]["max"]
            rows.append({"algorithm": name, "bytes_sent_per_worker": mx["bytes_sent"], "collectives": mx["collectives"],
                         "blocked_s": mx["blocked_s"], "wall_s": s["wall_s"], "final_val_loss": s["eval"]["value"]})
    ddp = rows[0]
    for r in rows:
        r["bytes_vs_ddp"] = r["bytes_sent_per_worker"] / ddp["bytes_sent_per_worker"]
        r["blocked_vs_ddp"] = r["blocked_s"] / ddp["blocked_s"] if ddp["blocked_s"] else None
    text = table(rows, [("algorithm", "algorithm"), ("bytes_sent_per_worker", "bytes sent/worker"), ("bytes_vs_ddp", "x DDP"),
                        ("collectives", "collectives"), ("blocked_s", "blocked s"), ("blocked_vs_ddp", "x DDP"),
                        ("wall_s", "wall s"), ("final_val_loss", "val loss")])
    ratio = ddp["bytes_sent_per_worker"] / rows[1]["bytes_sent_per_worker"]
    text += f"\n\nDDP bytes / DiLoCo bytes = {ratio:.1f} (H = {h}); {args.workers} workers, {steps} steps"
    write_outputs(args.out, {"workers": args.workers, "steps": steps, "sync_every": h, "rows": rows, "ddp_over_diloco_bytes": ratio}, text)


if __name__ == "__main__":
    main()
