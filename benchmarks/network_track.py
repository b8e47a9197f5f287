"""The network track: DDP vs DiLoCo vs NoLoCo (AdamW / NAdamW inner) scored per network profile.

Each submission (algorithm + optimizer setting) trains every workload of
configs/studies/network_track.yaml once per trial on 4 workers (the local backend: threads, one
torch thread each). Its time to target under a network profile is its compute time plus the
communication its backend counted, costed by dtrain.scoring.network (latency per hop, bytes over
bandwidth); the AlgoPerf v0.6 rules (dtrain.scoring.profiles) then score each profile apart:

    datacenter  100 Gbit/s + 5 us     wan  1 Gbit/s + 50 ms     internet  100 Mbit/s + 100 ms

``--validate`` (root: network namespaces) first checks the cost model against measured runs
over emulated links (launchers/wan.py): DDP, DiLoCo and NoLoCo train a fixed number of char_lm
steps on 4 workers, once unshaped (compute and counters) and once under each of two profiles; the
training time of the unshaped run plus its traffic costed under the profile is compared with the
training time measured under the profile.

    python benchmarks/network_track.py --validate --out benchmarks/results/network_track.json \\
        --plot benchmarks/results/network_track.png
    python benchmarks/network_track.py --quick        # CI smoke run: 3 submissions, 1 tiny workload
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dtrain.scoring.network import PROFILES, NetworkProfile, load_trial_run, modelled_seconds, parse_profile  # noqa: E402
from dtrain.scoring.profiles import Scores, score_submissions  # noqa: E402
from dtrain.scoring.report import format_table, write_json  # noqa: E402
from dtrain.scoring.runner import plan, run_study  # noqa: E402
from dtrain.scoring.study import load_study  # noqa: E402

WORKERS = 4
ALGOS: dict[str, dict[str, Any]] = {
    "ddp": {"name": "ddp"},
    "diloco": {"name": "diloco", "sync_every": 50},  # H = 50 (the NoLoCo paper's comparison used 100 on longer runs)
    "noloco": {"name": "noloco", "sync_every": 50},
}
OPTIMS = ("adamw", "nadamw")  # the settings of configs/submissions/<name>.yaml
LOW_COMM = ("diloco", "noloco")
# --quick: one tiny digits_cnn (the scoring test's settings) and H = 10 so that syncs happen.
QUICK_SET = ["steps=60", "eval_every=20", "workload.target=0.6", "workload.channels=8", "workload.hidden=32"]
VALIDATION_NETS = ("wan", "internet")
HARNESS_MTU = 9000  # launchers/wan.py's veths: the cost model's segment size must match them
VALIDATION_JOB = ["workload.n_layer=2", "workload.d_model=64", "workload.n_head=4", "workload.eval_batches=2", "threads=1",
                  "progress=false", "plot=false", "ckpt_every=0", "stop_at_target=false"]
VALIDATION_ALGOS = [("ddp", "configs/ddp.yaml", []), ("diloco/H=10", "configs/diloco.yaml", ["algo.sync_every=10"]),
                    ("noloco/H=10", "configs/noloco.yaml", ["algo.sync_every=10"])]


def write_submissions(out: Path, *, algos: dict[str, dict[str, Any]], optims: tuple[str, ...], sync_every: int | None) -> list[Path]:
    """One YAML per (algorithm, optimizer): the optimizer block of configs/submissions/<optim>.yaml."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for a, algo in algos.items():
        for o in optims:
            optim = OmegaConf.to_container(OmegaConf.load(ROOT / "configs" / "submissions" / f"{o}.yaml"))["optim"]
            algo_cfg = dict(algo, **({"sync_every": sync_every} if sync_every and "sync_every" in algo else {}))
            path = out / f"{a}_{o}.yaml"
            OmegaConf.save(OmegaConf.create({"algo": algo_cfg, "comm": {"name": "local", "workers": WORKERS}, "optim": optim}), path)
            paths.append(path)
    return paths


def modelled_tables(results: list, networks: list[NetworkProfile], names: list[str]) -> dict[str, dict]:
    """network -> submission -> workload -> studies -> modelled time to target."""
    runs = {r.out_dir: load_trial_run(r.out_dir) for r in results}
    tables: dict[str, dict] = {}
    for net in networks:
        by: dict[str, dict[str, dict[int, list[float]]]] = {n: {} for n in names}
        for r in results:
            t = runs[r.out_dir].time_to_target(net) if not r.error else math.inf
            by[r.submission].setdefault(r.workload, {}).setdefault(r.study, []).append(t)
        tables[net.name] = {s: {w: [st[j] for j in sorted(st)] for w, st in pw.items()} for s, pw in by.items()}
    return tables


def _family_best(scores: Scores, family: tuple[str, ...]) -> tuple[str, float]:
    cands = [s for s in scores.scores if s.split("_")[0] in family]
    best = max(cands, key=lambda s: (scores.scores[s], s))
    return best, scores.scores[best]


def verdict_lines(per_net: dict[str, Scores]) -> list[str]:
    """Per profile: the best DDP and the best low-communication submission, and the time ratio between them."""
    lines = []
    for net, sc in per_net.items():
        ddp, ddp_score = _family_best(sc, ("ddp",))
        low, low_score = _family_best(sc, LOW_COMM)
        speed = []
        for w in sc.workloads:
            a, b = sc.per_workload[ddp][w], sc.per_workload[low][w]
            if math.isfinite(a) and math.isfinite(b) and b > 0:
                speed.append(f"{w} {a / b:.2f}x")
        winner = ddp if ddp_score > low_score else low if low_score > ddp_score else "tie"
        lines.append(f"{net}: best DDP {ddp} {ddp_score:.3f}, best low-communication {low} {low_score:.3f} -> {winner}; "
                     f"DDP time / low-comm time: {', '.join(speed) or 'n/a'}")
    return lines


def plot(path: Path, per_net: dict[str, Scores]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(per_net), figsize=(5 * len(per_net), 4.2), sharey=True)
    names = sorted({s for sc in per_net.values() for s in sc.scores})
    colors = {s: plt.cm.tab10(i % 10) for i, s in enumerate(names)}  # one color per submission in every panel
    for ax, (net, sc) in zip(axes if len(per_net) > 1 else [axes], per_net.items()):
        for s in sorted(sc.scores, key=lambda s: (-sc.scores[s], s)):
            style = "-" if s.startswith("ddp") else "--" if s.startswith("diloco") else ":"
            ax.step(sc.taus, sc.profiles[s], where="post", linestyle=style, color=colors[s],
                    label=f"{s} ({sc.scores[s]:.2f})")
        ax.set_title(f"{net}: {PROFILES[net].describe() if net in PROFILES else net}")
        ax.set_xlabel("τ (time / fastest)")
        ax.set_xlim(sc.taus[0], sc.taus[-1])
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    axes_list = axes if len(per_net) > 1 else [axes]
    axes_list[0].set_ylabel("ρ(τ): share of workloads")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_wan(rate: str, delay_ms: float, config: str, out_dir: Path, overrides: list[str]) -> dict[str, Any]:
    cmd = [sys.executable, str(ROOT / "launchers" / "wan.py"), "--workers", str(WORKERS), "--rate", rate,
           "--delay-ms", str(delay_ms), "--", config, f"out_dir={out_dir}", *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"{config} over {rate or 'unshaped'}/{delay_ms}ms failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return json.loads((out_dir / "summary.json").read_text())


def _tc_rate(net: NetworkProfile) -> str:
    return f"{net.bandwidth_bit_s / 1e6:g}mbit"


def validate(steps: int, root: Path) -> list[dict[str, Any]]:
    """Modelled (from an unshaped run) vs measured (under the emulated profile) training seconds.

    The runs stay under ``root`` (cleared first) so the model can be re-checked against them.
    """
    rows = []
    job = [*VALIDATION_JOB, f"steps={steps}", f"eval_every={steps}"]
    if root.exists():
        shutil.rmtree(root)
    for name, config, extra in VALIDATION_ALGOS:
        plain_dir = root / f"{name.replace('/', '_')}-plain"
        run_wan("", 0.0, config, plain_dir, [*job, *extra])
        plain = load_trial_run(plain_dir)
        for net_name in VALIDATION_NETS:
            net = replace(PROFILES[net_name], mtu=HARNESS_MTU)
            out = root / f"{name.replace('/', '_')}-{net_name}"
            t0 = time.perf_counter()
            summary = run_wan(_tc_rate(net), net.latency_s * 1e3, config, out, [*job, *extra])
            rows.append(validation_row(name, net, plain, summary, steps))
            print(f"[validate {name} {net_name}] modelled {rows[-1]['modelled_s']:.1f}s measured {rows[-1]['measured_s']:.1f}s "
                  f"({time.perf_counter() - t0:.0f}s)", file=sys.stderr, flush=True)
    return rows


def validation_row(name: str, net: NetworkProfile, plain: Any, summary: dict[str, Any], steps: int) -> dict[str, Any]:
    measured = max(w["train_time_s"] for w in summary["workers"])
    modelled = modelled_seconds(plain.traffic, world_size=plain.world_size, network=net)
    return {"algo": name, "network": net.name, "profile": net.describe(), "steps": steps,
            "unshaped_train_s": max(t.train_s for t in plain.traffic), "modelled_s": modelled, "measured_s": measured,
            "measured_blocked_s": max(w["comm"]["blocked_s"] for w in summary["workers"]), "error": modelled / measured - 1}


def validation_table(rows: list[dict[str, Any]]) -> str:
    out = [f"{'algorithm':<12} {'network':<9} {'profile':<20} {'unshaped s':>10} {'modelled s':>10} {'measured s':>10} {'error':>7}"]
    for r in rows:
        out.append(f"{r['algo']:<12} {r['network']:<9} {r['profile']:<20} {r['unshaped_train_s']:10.1f} {r['modelled_s']:10.1f} "
                   f"{r['measured_s']:10.1f} {r['error'] * 100:+6.1f}%")
    worst = max(abs(r["error"]) for r in rows)
    out.append(f"worst |modelled / measured - 1| = {worst * 100:.1f}% (bar: 15%) over {len(rows)} runs")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="3 submissions (AdamW inner) x tiny digits_cnn, one trial")
    p.add_argument("--validate", action="store_true", help="also check the cost model over emulated links (root)")
    p.add_argument("--validate-steps", type=int, default=30, help="training steps of each validation run")
    p.add_argument("--study", default=str(ROOT / "configs" / "studies" / "network_track.yaml"))
    p.add_argument("--networks", default=",".join(PROFILES), help="comma-separated profiles (named or RATE+LATENCY)")
    p.add_argument("--root", default=str(ROOT / "runs" / "network_track"), help="where the trials' run folders go")
    p.add_argument("--out", default=None, help="write the JSON here")
    p.add_argument("--plot", default=None, help="write the profile plot here (default ROOT/profiles.png)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    try:
        networks = [parse_profile(n) for n in args.networks.split(",") if n]
        study = load_study(args.study)
    except ValueError as e:
        print(f"network_track: error: {e}", file=sys.stderr)
        return 2
    if args.validate and os.geteuid() != 0:
        print("network_track: error: --validate needs root (network namespaces); drop --validate or run as root", file=sys.stderr)
        return 2
    start = time.perf_counter()
    root = Path(args.root) / ("quick" if args.quick else "full")
    validation = validate(args.validate_steps, Path(args.root) / "validate") if args.validate else []
    algos = ALGOS
    optims = OPTIMS[:1] if args.quick else OPTIMS
    workloads = ["digits_cnn"] if args.quick else list(study.workloads)
    subs = write_submissions(root / "submissions", algos=algos, optims=optims, sync_every=10 if args.quick else None)
    names = [s.stem for s in subs]
    trials = plan(subs, workloads, trials=study.trials, studies=study.studies, root=root / "trials")
    print(f"network track: {len(subs)} submissions x {len(workloads)} workloads x {study.studies} studies x "
          f"{study.trials} trials on {WORKERS} workers = {len(trials)} trials under {root}", flush=True)
    results = run_study(trials, threads=1, in_process=True, run_overrides=QUICK_SET if args.quick else (),
                        echo=lambda s: print(s, flush=True))
    tables = modelled_tables(results, networks, names)
    per_net = {net: score_submissions(t, workloads=workloads, ruleset=study.ruleset, max_ratio=study.max_ratio)
               for net, t in tables.items()}
    for net in networks:
        print(f"\n{net.name} ({net.describe()}): modelled training seconds to target (ratio to the fastest)\n"
              + format_table(per_net[net.name]))
    lines = verdict_lines(per_net)
    print("\n" + "\n".join(lines))
    if validation:
        print("\nCost model vs emulated links (launchers/wan.py, 4 workers, char_lm 2x64, fixed steps):\n"
              + validation_table(validation))
    plot_path = Path(args.plot) if args.plot else root / "profiles.png"
    plot(plot_path, per_net)
    print(f"\nplot: {plot_path}")
    if args.out:
        write_json(args.out, {
            "benchmark": "network_track", "quick": args.quick, "workers": WORKERS, "study": study.as_dict(),
            "workloads": workloads, "algorithms": algos, "optimizers": list(optims),
            "networks": {n.name: {"bandwidth_bit_s": n.bandwidth_bit_s, "latency_s": n.latency_s} for n in networks},
            "scores": {net: sc.scores for net, sc in per_net.items()},
            "times_s": {net: {s: {w: (t if math.isfinite(t) else None) for w, t in row.items()} for s, row in sc.per_workload.items()}
                        for net, sc in per_net.items()},
            "ratios": {net: {s: {w: (r if math.isfinite(r) else None) for w, r in row.items()} for s, row in sc.ratios.items()}
                       for net, sc in per_net.items()},
            "profiles": {net: sc.profiles for net, sc in per_net.items()}, "taus": next(iter(per_net.values())).taus,
            "verdict": lines, "validation": validation, "trials": [r.as_json() for r in results],
            "machine": {"cores": os.cpu_count(), "torch": torch.__version__}, "wall_s": time.perf_counter() - start,
        })
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
