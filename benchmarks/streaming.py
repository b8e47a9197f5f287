"""Streaming DiLoCo and compressed outer updates, for DiLoCo and NoLoCo, at equal tokens.

Part ``local`` (4 workers under torchrun, gloo on loopback; ``--quick``: threads of one process; loss and bytes):
  DiLoCo; Streaming DiLoCo with P in {1, 4} fragments and overlap tau in {0, 5} (alpha 0 without
  overlap, 0.5 with it); DiLoCo with top-k 3% (2-bit values) + error feedback and with 4-bit
  (int4, E3M0-style); NoLoCo, plain and with the same two codecs. Per row: final validation loss
  (mean over workers), bytes each worker sent inside optimizer steps (the algorithm's own traffic:
  setup broadcast and the loop's evaluation excluded), the most bytes sent in any one step, and
  ratios against DiLoCo (NoLoCo's codec rows also against NoLoCo plain).
Part ``wan`` (real processes: one torchrun per network namespace, launchers/wan.py, 100 Mbit/s +
  50 ms one way, root needed): DiLoCo against Streaming DiLoCo (P = 4, tau = 5, alpha = 0.5), seconds
  each worker was blocked in the outer steps' own communication (and in all communication).

Part ``memory``: the outer state each algorithm keeps per worker with ``outer_device=same`` and
``=cpu``: its bytes, the bytes on an accelerator, and (with CUDA) the accelerator's peak allocation.

Workload: the workload and optim sections of configs/frontier.yaml when it exists (--batch overrides its
per-worker batch), else char_lm with 2 layers, d_model 64 (137k
parameters) and 64 sequences of 64 bytes per worker and step; the JSON names the one used.

    python benchmarks/streaming.py [--quick] [--part local|wan|all] [--out benchmarks/results/streaming.json]
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from streaming_memory import memory_table, run_memory

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

FRONTIER = REPO / "configs" / "frontier.yaml"
CHAR_LM = ["workload.name=char_lm", "workload.n_layer=2", "workload.d_model=64", "workload.n_head=4",
           "workload.batch_size=64"]
QUICK_MODEL = ["workload.name=char_lm", "workload.n_layer=1", "workload.d_model=32", "workload.n_head=2",
               "workload.seq_len=32", "workload.batch_size=8", "workload.eval_batches=2", "workload.eval_batch_size=8"]
QUICK_ROWS = {"diloco", "streaming P4 tau2", "diloco topk3%+EF", "diloco int4", "noloco topk3%+EF", "streaming noloco P4 tau2"}
TOPK = ["algo.compression=topk", "algo.topk_density=0.03", "algo.error_feedback=true"]
INT4 = ["algo.compression=int4"]
# SparseLoCo's recipe: error feedback (decay 0.95) in place of outer momentum, outer lr 1
SPARSELOCO = [*TOPK, "algo.outer_lr=1.0", "algo.outer_momentum=0.0", "algo.nesterov=false", "algo.error_feedback_decay=0.95"]


def rows_for(h: int, quick: bool) -> list[tuple[str, str, str, list[str], bool]]:
    """(family, label, config, overrides, decides a goal: run every seed)."""
    s = "configs/streaming_diloco.yaml"
    tau = 2 if quick else 5

    def streaming(p: int, t: int) -> list[str]:
        return [f"algo.fragments={p}", f"algo.overlap_steps={t}", f"algo.mix_alpha={0.5 if t else 0.0}"]

    return [
        ("diloco", "diloco", "configs/diloco.yaml", [], True),
        ("diloco", "streaming P1 tau0", s, streaming(1, 0), False),  # DiLoCo bit for bit (tests/test_streaming.py)
        ("diloco", f"streaming P1 tau{tau}", s, streaming(1, tau), False),
        ("diloco", "streaming P4 tau0", s, streaming(4, 0), True),
        ("diloco", f"streaming P4 tau{tau}", s, streaming(4, tau), True),
        # tau = H/2: the overlap window in seconds (tau x step time) must outlast a fragment's reduction,
        # which over a WAN is bound by the ring's 2(N-1) one-way latencies, not by the fragment's size
        ("diloco", f"streaming P4 tau{h // 2}", s, streaming(4, h // 2), False),
        ("diloco", "diloco topk3%+EF", "configs/diloco.yaml", TOPK, True),
        ("diloco", "diloco int4", "configs/diloco.yaml", INT4, True),
        # SparseLoCo's way: error feedback in place of outer momentum, outer lr 1 (a variant, not a goal row)
        ("diloco", "topk3%+EF lr1 m0", "configs/diloco.yaml",
         [*TOPK, "algo.outer_lr=1.0", "algo.outer_momentum=0.0", "algo.nesterov=false"], False),
        # what closes top-k's gap (variants, one seed): value precision, density, chunk size, SparseLoCo's
        # error-feedback decay, and more outer steps (H = 8: 4x the rounds; compare with "diloco H8")
        ("diloco", "topk3%+EF 4-bit values", "configs/diloco.yaml", [*TOPK, "algo.topk_value_bits=4"], False),
        ("diloco", "topk10%+EF", "configs/diloco.yaml", [*TOPK, "algo.topk_density=0.1"], False),
        ("diloco", "topk3%+EF chunk64", "configs/diloco.yaml", [*TOPK, "algo.topk_chunk=64"], False),
        ("diloco", "topk3%+EF decay0.95", "configs/diloco.yaml", [*TOPK, "algo.error_feedback_decay=0.95"], False),
        ("diloco", "topk3%+EF lr1 m0 decay0.95", "configs/diloco.yaml", SPARSELOCO, False),
        ("diloco", "topk3%+EF H8", "configs/diloco.yaml", [*TOPK, "algo.sync_every=8"], False),
        ("diloco", "diloco H128", "configs/diloco.yaml", ["algo.sync_every=128"], False),  # DiLoCo at top-k H4's bytes
        *[row for k in (8, 4) for row in (
            ("diloco", f"diloco H{k}", "configs/diloco.yaml", [f"algo.sync_every={k}"], False),
            ("diloco", f"topk3%+EF lr1 m0 decay0.95 H{k}", "configs/diloco.yaml", [*SPARSELOCO, f"algo.sync_every={k}"], False))],
        ("noloco", "noloco", "configs/noloco.yaml", [], True),
        ("noloco", "noloco topk3%+EF", "configs/noloco.yaml", TOPK, True),
        ("noloco", "noloco int4", "configs/noloco.yaml", INT4, True),
        ("noloco", f"streaming noloco P4 tau{tau}", "configs/streaming_noloco.yaml", streaming(4, tau), False),
    ]


def workload(quick: bool, batch: int | None = None) -> tuple[list[str], str]:
    if quick:
        return QUICK_MODEL, "char_lm 1 layer d32 (smoke run)"
    if FRONTIER.exists():  # its workload and optimizer keys, over each row's own config file
        import yaml

        cfg = yaml.safe_load(FRONTIER.read_text())
        keys = [f"{section}.{k}={v}" for section in ("workload", "optim") for k, v in cfg[section].items()]
        name = "configs/frontier.yaml (workload and optim sections)"
    else:
        keys, name = CHAR_LM, "char_lm 2 layers d64, 64 sequences x 64 bytes per worker and step"
    if batch is not None:
        keys, name = [*keys, f"workload.batch_size={batch}"], f"{name} with {batch} sequences per worker and step"
    return keys, name


def summarise(label: str, family: str, seed: int, summary: dict[str, Any]) -> dict[str, Any]:
    workers = summary["workers"]
    algos = [w["algorithm"] for w in workers]
    return {
        "label": label, "family": family, "seed": seed, "val_loss": summary["eval"]["mean_over_workers"],
        "bytes_per_worker": statistics.mean(a["step_bytes"] for a in algos),
        "peak_step_bytes": max(a["peak_step_bytes"] for a in algos),
        "outer_syncs": algos[0].get("outer_syncs"), "skipped_syncs": max(a.get("skipped_syncs", 0) for a in algos),
        "comm_blocked_s": statistics.mean(w["comm"]["blocked_s"] for w in workers),
        "outer_blocked_s": statistics.mean(a.get("outer_blocked_s", a.get("delta_wait_s", 0.0)) for a in algos),
    }


def run_local(args: argparse.Namespace, tmp: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    import torch

    from common import torchrun_train
    from dtrain.config import load
    from dtrain.train import run

    torch.set_num_threads(1)
    model, name = workload(args.quick, args.batch)
    h = 8 if args.quick else args.sync_every
    steps = 2 * h if args.quick else args.outer_steps * h
    workers = 2 if args.quick else args.workers
    common = [*model, f"steps={steps}", f"eval_every={steps}", f"algo.sync_every={h}", "ckpt_every=0", "progress=false",
              "plot=false", "threads=1"]
    seeds = [0] if args.quick else list(args.seed_list if args.seed_list is not None else range(args.seeds))
    out: list[dict[str, Any]] = []
    for family, label, config, extra, goal in rows_for(h, args.quick):
        if (args.only and label not in args.only) or (args.quick and label not in QUICK_ROWS):
            continue
        for seed in seeds if goal else seeds[:1]:
            t0 = time.perf_counter()
            out_dir = tmp / f"{label}-{seed}".replace(" ", "_")
            if args.quick:  # threads of this process: no start-up cost
                summary = run(load(config, [*common, *extra, f"seed={seed}", f"out_dir={out_dir}", "comm.name=local",
                                            f"comm.workers={workers}"]))
            else:  # one process per worker (torchrun, gloo on loopback): four threads of one process share its GIL
                summary = torchrun_train(workers, config, out_dir, [*common, *extra, f"seed={seed}"])
            out.append(summarise(label, family, seed, summary))
            if args.out:  # what is done so far survives a later failure
                args.out.with_suffix(".partial.json").write_text(json.dumps({"local": out}, indent=2))
            print(f"[local] {label} seed {seed}: val_loss {out[-1]['val_loss']:.4f} ({time.perf_counter() - t0:.0f}s)",
                  file=sys.stderr, flush=True)
    setup = {"workload": name, "workers": workers, "steps": steps, "sync_every": h, "outer_steps": steps // h, "seeds": seeds}
    return out, setup


def run_wan(args: argparse.Namespace, tmp: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    model, name = workload(False, args.batch)
    h, steps = args.sync_every, args.wan_outer_steps * args.sync_every
    common = [*model, f"steps={steps}", f"eval_every={steps}", f"algo.sync_every={h}", "ckpt_every=0", "progress=false",
              "plot=false", "threads=1"]
    runs = [("diloco", "configs/diloco.yaml", []),
            ("streaming P4 tau5", "configs/streaming_diloco.yaml", ["algo.fragments=4", "algo.overlap_steps=5", "algo.mix_alpha=0.5"]),
            ("streaming P4 tau1", "configs/streaming_diloco.yaml", ["algo.fragments=4", "algo.overlap_steps=1", "algo.mix_alpha=0.5"]),
            (f"streaming P4 tau{h // 2}", "configs/streaming_diloco.yaml",
             ["algo.fragments=4", f"algo.overlap_steps={h // 2}", "algo.mix_alpha=0.5"])]
    runs = [r for r in runs if not args.wan_only or r[0] in args.wan_only]
    wan = [sys.executable, str(REPO / "launchers" / "wan.py"), "--workers", str(args.workers), "--rate", args.rate,
           "--delay-ms", str(args.delay_ms)]
    probe = subprocess.run([*wan[:3], "2", *wan[4:], "--probe"], capture_output=True, text=True, timeout=300).stdout.strip()
    print(f"[wan] probe: {probe}", file=sys.stderr, flush=True)
    out = []
    for rep in range(args.wan_repeats):  # interleaved, so machine load hits both alike
        for label, config, extra in runs:
            out_dir = tmp / f"wan-{label.replace(' ', '_')}-{rep}"
            t0 = time.perf_counter()
            proc = subprocess.run([*wan, "--", config, f"out_dir={out_dir}", *common, *extra], cwd=REPO,
                                  capture_output=True, text=True, timeout=3600)
            if proc.returncode != 0:
                raise RuntimeError(f"{label} over the WAN failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
            summary = json.loads((out_dir / "summary.json").read_text())
            out.append({**summarise(label, "wan", rep, summary), "wall_s": max(w["wall_s"] for w in summary["workers"])})
            print(f"[wan] {label} #{rep}: outer blocked {out[-1]['outer_blocked_s']:.2f}s ({time.perf_counter() - t0:.0f}s)",
                  file=sys.stderr, flush=True)
    setup = {"workload": name, "workers": args.workers, "steps": steps, "sync_every": h, "rate": args.rate,
             "delay_ms": args.delay_ms, "probe": probe, "repeats": args.wan_repeats}
    return out, setup


def mean_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows averaged over seeds, in first-seen order (val_loss also as a std)."""
    out: dict[str, dict[str, Any]] = {}
    for label in dict.fromkeys(r["label"] for r in rows):
        mine = [r for r in rows if r["label"] == label]
        avg = {k: statistics.mean(r[k] for r in mine) for k in mine[0] if isinstance(mine[0][k], (int, float)) and k != "seed"}
        avg["val_loss_std"] = statistics.stdev(r["val_loss"] for r in mine) if len(mine) > 1 else 0.0
        out[label] = {"label": label, "family": mine[0]["family"], "seeds": len(mine), **avg}
    return list(out.values())


def paired(raw: list[dict[str, Any]], label: str, ref: str) -> float | None:
    """Mean val loss of ``ref`` over the seeds ``label`` ran (seed-matched comparisons)."""
    seeds = {r["seed"] for r in raw if r["label"] == label}
    losses = [r["val_loss"] for r in raw if r["label"] == ref and r["seed"] in seeds]
    return statistics.mean(losses) if losses and len(losses) == len(seeds) else None


def reference_label(label: str, labels: Any) -> str:
    """The DiLoCo row a row is compared with: "diloco H8" for a row ending in " H8" (when it ran), else "diloco"."""
    m = re.search(r" H(\d+)$", label)
    own = f"diloco H{m[1]}" if m else ""
    return own if m and label != own and own in labels else "diloco"


def local_table(rows: list[dict[str, Any]], raw: list[dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    by = {r["label"]: r for r in rows}
    lines = [f"{'algorithm':<31} {'seeds':>5} {'val_loss':>15} {'vs DiLoCo*':>10} {'MB/worker':>9} {'x fewer':>7} "
             f"{'peak KB/step':>12} {'peak/DiLoCo':>11}"]
    for r in rows:
        loss = f"{r['val_loss']:.4f}" + (f"±{r['val_loss_std']:.4f}" if r["seeds"] > 1 else "")
        ref_label = reference_label(r["label"], by)
        ref = by.get(ref_label)
        base = paired(raw, r["label"], ref_label)
        r["loss_vs_diloco_pct"] = 100 * (r["val_loss"] / base - 1) if base else None
        r["bytes_x_fewer"] = ref["bytes_per_worker"] / r["bytes_per_worker"] if ref and r["bytes_per_worker"] else None
        r["peak_vs_diloco"] = r["peak_step_bytes"] / ref["peak_step_bytes"] if ref and ref["peak_step_bytes"] else None
        fmt = (lambda v, f: f"{v:{f}}" if v is not None else "-")
        lines.append(f"{r['label']:<31} {r['seeds']:>5} {loss:>15} {fmt(r['loss_vs_diloco_pct'], '+8.2f')}% "
                     f"{r['bytes_per_worker'] / 1e6:9.3f} {fmt(r['bytes_x_fewer'], '7.1f')} {r['peak_step_bytes'] / 1e3:12.1f} "
                     f"{fmt(r['peak_vs_diloco'], '11.3f')}")
    lines.append("* against DiLoCo at the row's H (\"diloco\" unless the label ends in H<k>) on the seeds the row ran; MB/worker: bytes each worker sent inside optimizer steps "
                 "(the outer steps' traffic); peak: the most any worker sent within one step")
    return "\n".join(lines), rows


def goals(rows: list[dict[str, Any]], wan: list[dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    by = {r["label"]: r for r in rows}
    lines, verdicts = ["goals:"], {}

    def check(key: str, ok: bool, text: str) -> None:
        verdicts[key] = ok
        lines.append(f"  [{'met' if ok else 'NOT met'}] {text}")

    d = by.get("diloco")
    for label in [k for k in by if k.startswith("streaming P4") and d]:
        s = by[label]
        check(f"{label}: peak", s["peak_vs_diloco"] <= 1 / 4 + 1e-3 and s["loss_vs_diloco_pct"] <= 1.0,
              f"{label}: peak bytes/step {s['peak_vs_diloco']:.3f}x DiLoCo's (<= 1/4) at {s['loss_vs_diloco_pct']:+.2f}% loss (<= +1%)")
    if d and "diloco topk3%+EF" in by:
        t = by["diloco topk3%+EF"]
        check("topk", t["loss_vs_diloco_pct"] <= 1.0 and t["bytes_x_fewer"] >= 20,
              f"top-k 3% + EF: {t['loss_vs_diloco_pct']:+.2f}% loss (<= +1%) at {t['bytes_x_fewer']:.1f}x fewer bytes (>= 20x)")
    def sound(r: dict[str, Any]) -> bool:
        """A variant counts only where its uncompressed reference is sound: DiLoCo at the row's H no worse than
        at the benchmark's H (DiLoCo's Nesterov 0.7 / 0.9 breaks at very small H, flattering any variant there)."""
        return d is not None and by[reference_label(r["label"], by)]["val_loss"] <= d["val_loss"]

    variants = [r for r in rows if r["family"] == "diloco" and "topk" in r["label"] and (r["bytes_x_fewer"] or 0) >= 20
                and r.get("loss_vs_diloco_pct") is not None and sound(r)]
    if variants:
        t = min(variants, key=lambda r: r["loss_vs_diloco_pct"])
        check("topk best", t["loss_vs_diloco_pct"] <= 1.0,
              f"best top-k variant at >= 20x fewer bytes ({t['label']}): {t['loss_vs_diloco_pct']:+.2f}% loss (<= +1%) "
              f"at {t['bytes_x_fewer']:.1f}x")
    for codec in ("topk3%+EF", "int4"):
        n, dd = by.get(f"noloco {codec}"), by.get(f"diloco {codec}")
        if n and dd:
            gap = 100 * (n["val_loss"] / dd["val_loss"] - 1)  # both ran the same seeds (goal rows)
            n["loss_vs_diloco_counterpart_pct"] = gap
            own = 100 * (n["val_loss"] / by["noloco"]["val_loss"] - 1) if "noloco" in by else None
            n["loss_vs_noloco_plain_pct"] = own
            plain = f"; {own:+.2f}% vs NoLoCo plain" if own is not None else ""
            check(f"noloco {codec}", abs(gap) <= 1.0, f"NoLoCo {codec}: {gap:+.2f}% loss vs DiLoCo {codec} (within 1%){plain}")
    if wan:
        w = mean_rows(wan)
        base = next(r for r in w if r["label"] == "diloco")
        for r in w:
            r["outer_blocked_vs_diloco"] = r["outer_blocked_s"] / base["outer_blocked_s"] if base["outer_blocked_s"] else None
            r["comm_blocked_vs_diloco"] = r["comm_blocked_s"] / base["comm_blocked_s"] if base["comm_blocked_s"] else None
            if r["label"] != "diloco":
                check(f"wan {r['label']}", (r["outer_blocked_vs_diloco"] or 0) <= 0.2,
                      f"WAN {r['label']}: outer-step blocked time {r['outer_blocked_vs_diloco']:.3f}x DiLoCo's (<= 0.2x)")
    return "\n".join(lines), verdicts


def wan_table(rows: list[dict[str, Any]], setup: dict[str, Any]) -> str:
    w = mean_rows(rows)
    base = next(r for r in w if r["label"] == "diloco")
    lines = [f"WAN ({setup['rate']}, +{setup['delay_ms']:g} ms one way; {setup['workers']} processes; mean of "
             f"{setup['repeats']} interleaved repeats): {setup['probe']}",
             f"{'algorithm':<20} {'val_loss':>8} {'outer blocked s':>15} {'vs DiLoCo':>9} {'all blocked s':>13} {'vs DiLoCo':>9} {'wall s':>7}"]
    for r in w:
        lines.append(f"{r['label']:<20} {r['val_loss']:8.4f} {r['outer_blocked_s']:15.2f} "
                     f"{r['outer_blocked_s'] / max(base['outer_blocked_s'], 1e-9):9.3f} {r['comm_blocked_s']:13.2f} "
                     f"{r['comm_blocked_s'] / max(base['comm_blocked_s'], 1e-9):9.3f} {r['wall_s']:7.1f}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a tiny model, 2 workers, 16 steps, no WAN part (smoke run)")
    parser.add_argument("--part", choices=["local", "wan", "memory", "all", "none"], default="all")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--sync-every", type=int, default=32, help="H (a multiple of 4 for P = 4)")
    parser.add_argument("--outer-steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=None, help="sequences per worker and step (default: the workload's)")
    parser.add_argument("--seeds", type=int, default=2, help="seeds for the rows a goal depends on")
    parser.add_argument("--only", nargs="*", help="run only these row labels")
    parser.add_argument("--seed-list", type=int, nargs="*", help="these seeds (goal rows; other rows: the first)")
    parser.add_argument("--merge", type=Path, nargs="*", help="combine the local rows of these earlier --out files")
    parser.add_argument("--rate", default="100mbit")
    parser.add_argument("--delay-ms", type=float, default=50.0)
    parser.add_argument("--wan-outer-steps", type=int, default=10)
    parser.add_argument("--wan-repeats", type=int, default=2)
    parser.add_argument("--wan-only", nargs="*", help="run only these WAN row labels (diloco is the reference)")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--keep", action="store_true", help="keep the other part's results already in --out")
    args = parser.parse_args()
    command = shlex.join(["python", "benchmarks/streaming.py", *sys.argv[1:]])
    payload: dict[str, Any] = {"command": command}
    if args.keep and args.out and args.out.exists():
        payload = {**json.loads(args.out.read_text()), "command": command}
    text, local, wan = [], payload.get("local", []), payload.get("wan", [])
    for path in args.merge or []:  # parts run side by side as separate processes
        part = json.loads(path.read_text())
        local += part["local"]
        payload.setdefault("local_setup", {**part["local_setup"], "seeds": []})
        payload["local_setup"]["seeds"] = sorted({*payload["local_setup"]["seeds"], *part["local_setup"]["seeds"]})
        previous = [c for c in payload.get("commands", "").split(" ; ") if c]
        payload["commands"] = " ; ".join(dict.fromkeys([*previous, *part.get("commands", part["command"]).split(" ; ")]))
    args.part = "none" if args.merge else args.part
    with tempfile.TemporaryDirectory(prefix="dtrain-bench-streaming-") as tmp:
        if args.part in ("local", "all"):
            local, payload["local_setup"] = run_local(args, Path(tmp))
        if local:
            table, averaged = local_table(mean_rows(local), local)
            setup = payload["local_setup"]
            text += [f"{setup['workload']}; {setup['workers']} workers; {setup['steps']} steps, H={setup['sync_every']} "
                     f"({setup['outer_steps']} outer steps); seeds {setup['seeds']} on the goal rows", table]
            payload["local"], payload["local_mean"] = local, averaged
        if args.part in ("wan", "all") and not args.quick:
            wan, payload["wan_setup"] = run_wan(args, Path(tmp))
        if wan:
            text.append(wan_table(wan, payload["wan_setup"]))
            payload["wan"] = wan
        if args.part in ("memory", "all"):
            payload["memory"], payload["memory_setup"] = run_memory(*workload(args.quick))
        if payload.get("memory"):
            text.append(memory_table(payload["memory"], payload["memory_setup"]))
    summary, payload["goals"] = goals(payload.get("local_mean", []), wan)
    text.append(summary)
    if wan:
        payload["wan_mean"] = mean_rows(wan)
    out = "\n\n".join(text)
    print(out)
    if args.out:
        previous = [c for c in payload.get("commands", "").split(" ; ") if c]
        payload["commands"] = " ; ".join(dict.fromkeys([*previous, command]))  # every invocation that filled this file
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(payload, indent=2))
        args.out.with_suffix(".txt").write_text(f"# {payload.get('commands', command)}\n{out}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
