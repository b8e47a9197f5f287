"""What `benchmarks/hdet.py` runs: one system (OneCycleLR over DDP / DiLoCo / NoLoCo, or HDET in one of its
forms, alone or over an outer algorithm) as 4 workers (threads, `run_local`) on char_lm, and its row.

Every run builds its workload from the seed, so a seed fixes the initial weights and the data stream;
all systems of a seed see the same ones. Communication is read from the Comm's own counters.
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Any

import torch

from dtrain.algorithms.base import AttachContext
from dtrain.algorithms.ddp import DDP
from dtrain.algorithms.diloco import DiLoCo
from dtrain.algorithms.hdet import HDET, shared_batch_probe
from dtrain.algorithms.noloco import NoLoCo
from dtrain.comm.local import run_local
from dtrain.optim import param_groups

WORKERS = 4
ONECYCLE = dict(pct_start=0.3, anneal_strategy="cos", cycle_momentum=False, div_factor=25.0, final_div_factor=10.0)
H = 5  # outer step every H inner steps (DiLoCo, NoLoCo, and HDET's converge over them or alone)
DILOCO = dict(outer_lr=0.7, outer_momentum=0.9, nesterov=True)  # the DiLoCo paper's outer step
NOLOCO = dict(outer_lr=0.7, outer_momentum=0.5)  # the NoLoCo paper's (γ = β, pairs)


def outer_options(sync: str) -> dict[str, Any]:
    return dict(DILOCO) if sync == "diloco" else dict(NOLOCO) if sync == "noloco" else {}


def select_settings(steps: int, *, outer: str = "none", grad_sync: bool = False, grid: str = "odd",
                    rounds: int = 1) -> dict[str, Any]:
    """HDET's select form: replicas apart at c·factors of the whole curve, scored by a probe (one shared
    held-out batch), all take the best; then c × the curve over the outer algorithm (no more exploring).

    The selection ends at 20% of the run (rounded to the outer period, H), split into ``rounds`` rounds
    (2 rounds: 2 × 20 steps of 200). Why 20%, not HDET's default 10%: over DiLoCo at 10% (step 20 of
    200, a third of the way up the warm-up) the probe still ranked the 10x-high lr first, from the
    right lr and from 10x high alike; at 20% it ranked the right one first (benchmarks/results/hdet.txt)."""
    total = max(H * rounds, steps // 5 // (H * rounds) * H * rounds) if outer != "none" else max(rounds, steps // 5)
    return dict(auto_lr_mode="select", select_steps=total, select_range=10.0, select_grid=grid,
                select_rounds=rounds, auto_lr_stop=total, spread=1.0, spacing="log", converge_every=H,
                auto_lr_warmup=H, auto_lr_alpha=None, auto_lr_beta=0.5, auto_lr_sigma=0.03, auto_lr_gain=1.0,
                grad_sync=grad_sync, probe_batches=1, outer=outer, outer_options=outer_options(outer))


def controller_settings(steps: int, *, outer: str = "none") -> dict[str, Any]:
    """The paper's mechanism: replicas at ρ_r = 2^u_r × c × the curve (×½ … ×2), converge every H steps
    (plain averaging, or the outer algorithm's step), the scale controller moving c from probe scores at
    every converge until the end of the warm-up ramp (30%), steering from the first round (no test)."""
    return dict(auto_lr_mode="scale", spread=1.0, spacing="log", converge_every=H, auto_lr_warmup=H,
                auto_lr_alpha=None, auto_lr_stop=int(ONECYCLE["pct_start"] * steps), auto_lr_beta=0.5,
                auto_lr_sigma=0.03, auto_lr_gain=1.0, grad_sync=False, probe_batches=1, outer=outer,
                outer_options=outer_options(outer))


def probe_steps(hdet: dict[str, Any] | None, steps: int) -> float:
    """Worker-step equivalents of the probe's forward passes (a forward ≈ 1/3 of a training step)."""
    if not hdet or not hdet.get("probe_batches") or not hdet.get("spread"):
        return 0.0
    every, warmup, stop = hdet["converge_every"], hdet["auto_lr_warmup"], hdet["auto_lr_stop"]
    select = hdet.get("select_steps") or 0
    rounds = hdet.get("select_rounds", 1) if select else 0
    probes = sum(1 for done in range(every, steps + 1, every)
                 if warmup <= done and done > select and (stop is None or done <= stop))
    return WORKERS * (probes + rounds) * hdet["probe_batches"] / 3


def run_system(workload: Any, *, kind: str, max_lr: float, steps: int, seed: int, sync: str = "ddp",
               hdet: dict[str, Any] | None = None) -> dict[str, Any]:
    """One run. kind=onecycle: torch's OneCycleLR with ``sync`` (ddp | diloco | noloco) hooked on the
    optimizer; kind=hdet: HDET with ``hdet``'s options (its own outer algorithm, if any)."""

    def worker(comm) -> dict[str, Any]:
        torch.set_num_threads(1)
        model = workload.build_model()
        opt = torch.optim.AdamW(param_groups(model, 0.1), lr=max_lr, betas=(0.9, 0.95), foreach=True)
        hook: Any = None
        if kind == "onecycle":
            if sync == "ddp":
                hook = DDP(opt, comm)
            elif sync == "diloco":
                hook = DiLoCo(opt, comm, sync_every=H, **DILOCO)
            else:
                hook = NoLoCo(opt, comm, sync_every=H, seed=seed, total_steps=steps, **NOLOCO)
            sched: Any = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=max_lr, total_steps=steps, **ONECYCLE)
        else:
            settings = dict(hdet or {})
            probe_batches = settings.pop("probe_batches", 0)
            ctx = AttachContext(model=model, optimizer=opt, comm=comm, seed=seed, total_steps=steps, lr=max_lr,
                                workload=workload)
            probe = shared_batch_probe(ctx, probe_batches) if probe_batches else None
            sched = HDET(opt, max_lr, total_steps=steps, **ONECYCLE, **settings, seed=seed, probe=probe, comm=comm)
        start, t0, nonfinite = comm.stats.copy(), time.perf_counter(), 0
        for step in range(steps):
            loss = workload.loss(model, workload.train_batch(step, comm.rank, comm.world_size))
            value = float(loss.detach())
            if math.isfinite(value):
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
            else:
                nonfinite += 1
                opt.zero_grad(set_to_none=True)
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step(value if math.isfinite(value) else None) if kind == "hdet" else sched.step()
        stats = (comm.stats - start).as_dict()
        comm.barrier()  # NoLoCo: a late partner finishes its last exchange with us
        out = {"rank": comm.rank, "train_s": time.perf_counter() - t0, "comm": stats, "nonfinite": nonfinite,
               "val_loss": workload.evaluate(model)["val_loss"]}
        if kind == "hdet":
            out["scale"] = sched.scale_values("lr")[0]
            out["selections"] = [(e["step"], e["selected"], e.get("factors"), e["losses"]) for e in sched.log
                                 if "selected" in e]
            sched.remove()
        if hook is not None:
            hook.remove()
        return out

    results = run_local(WORKERS, worker, timeout=3600)
    r0 = results[0]
    vals = [r["val_loss"] for r in results]
    finite = [v for v in vals if math.isfinite(v)]
    return {"kind": kind, "sync": sync if kind == "onecycle" else (hdet or {}).get("outer", "none"), "max_lr": max_lr,
            "seed": seed, "steps": steps, "worker_steps": WORKERS * steps + probe_steps(hdet, steps),
            # the model a low-communication run hands over: the mean over workers of their final val loss
            "val_loss": sum(finite) / len(finite) if finite else math.inf, "val_loss_per_worker": vals,
            "bytes_sent_per_worker": max(r["comm"]["bytes_sent"] for r in results),
            "collectives_per_worker": max(r["comm"]["collectives"] for r in results),
            "train_s": max(r["train_s"] for r in results), "nonfinite_steps": sum(r["nonfinite"] for r in results),
            "scale": r0.get("scale"), "peak_lr": max_lr * r0["scale"] if r0.get("scale") else None,
            "selections": r0.get("selections"), "hdet": hdet,
            "select_scores": r0["selections"][-1][3] if r0.get("selections") else None}


def mean_std(values: list[float]) -> tuple[float, float]:
    finite = [v if math.isfinite(v) else math.inf for v in values]
    if any(math.isinf(v) for v in finite):
        return math.inf, math.nan
    return statistics.fmean(finite), statistics.stdev(finite) if len(finite) > 1 else 0.0
