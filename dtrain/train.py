"""The training loop behind `dtrain train`: one user of the same public APIs a user's loop calls.

`run(cfg)` starts the workers (threads for comm=local, else this process is one worker under
torchrun), trains, evaluates, checkpoints, and returns the summary on rank 0 (None elsewhere).
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from dtrain import checkpoint
from dtrain.algorithms.base import AttachContext, Attached
from dtrain.comm.base import Comm, CommError, CommStats
from dtrain.config import section_module
from dtrain.optim import build_optimizer, build_scheduler
from dtrain.report import MetricsLog, Progress, aggregate_comm, finite_or_none, peak_mem_bytes, plot_loss, write_json


class TrainingError(RuntimeError):
    """The run cannot go on; the message says why and what to change."""


def run(cfg: DictConfig) -> dict[str, Any] | None:
    """Train with ``cfg`` (from `dtrain.config.load`); the summary on rank 0, None on other ranks."""
    if cfg.comm.name == "local":
        from dtrain.comm.local import run_local

        n = cfg.comm.workers
        _set_threads(cfg, workers_here=n)
        results = run_local(n, lambda comm: train_worker(cfg, comm), timeout=cfg.comm.timeout_s)
        return results[0]
    _set_threads(cfg, workers_here=int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    comm = section_module("comm", cfg.comm.name).connect(cfg.comm)
    try:
        return train_worker(cfg, comm)
    finally:
        comm.close()


def _set_threads(cfg: DictConfig, *, workers_here: int) -> None:
    threads = cfg.threads or max(1, (os.cpu_count() or 1) // max(1, workers_here))
    torch.set_num_threads(threads)


def _build(cfg: DictConfig, comm: Comm) -> tuple[Any, torch.nn.Module, torch.optim.Optimizer, Attached, Any, Any]:
    workload = section_module("workload", cfg.workload.name).build(cfg.workload, seed=cfg.seed)
    model = workload.build_model()
    optimizer = build_optimizer(cfg.optim, model)
    ctx = AttachContext(
        model=model, optimizer=optimizer, comm=comm, seed=cfg.seed, total_steps=cfg.steps,
        lr=optimizer.param_groups[0]["lr"], workload=workload, loss_fn=workload.loss,
    )
    lisa = None
    if cfg.lisa.enabled:
        from dtrain.algorithms.lisa import attach_lisa

        lisa = attach_lisa(cfg.lisa, ctx)
    attached = section_module("algo", cfg.algo.name).attach(cfg.algo, ctx)
    scheduler = attached.scheduler or build_scheduler(cfg.optim, optimizer, cfg.steps)
    return workload, model, optimizer, attached, scheduler, lisa


def _resume_step(cfg: DictConfig, comm: Comm) -> int | None:
    """The newest step that every worker can load (agreed with one min all-reduce), or None."""
    local = -1
    for step in reversed(checkpoint.steps_available(cfg.out_dir, comm.rank)):
        try:
            checkpoint.load(cfg.out_dir, comm.rank, step)
            local = step
            break
        except checkpoint.CheckpointError:
            continue
    agreed = torch.tensor([float(local)])
    comm.all_reduce([agreed], op="min")
    step = int(agreed.item())
    if step < 0:
        if local >= 0 or checkpoint.steps_available(cfg.out_dir, comm.rank):
            raise TrainingError(f"resume=true but some worker has no readable checkpoint in {cfg.out_dir}; set resume=false to start over")
        return None
    return step


def train_worker(cfg: DictConfig, comm: Comm) -> dict[str, Any] | None:
    rank, world = comm.rank, comm.world_size
    out = Path(cfg.out_dir)
    workload, model, optimizer, attached, scheduler, lisa = _build(cfg, comm)
    algo = attached.algorithm
    state: dict[str, Any] = {
        "train_time_s": 0.0, "wall_s": 0.0, "time_to_target_s": None, "nonfinite_steps": 0,
        "initial_eval": None, "comm": CommStats().as_dict(),
    }
    start = _resume_step(cfg, comm) if cfg.resume else None
    if start is not None:
        saved = checkpoint.load(cfg.out_dir, rank, start)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        algo.load_state_dict(saved["algorithm"])
        if lisa is not None:
            lisa.load_state_dict(saved["lisa"])
        state.update(saved["run"])
    first = start or 0
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    bar = Progress(enabled=cfg.progress and rank == 0, total=cfg.steps, initial=first)
    window = comm.stats.copy()  # counters cover training only (setup collectives excluded)
    saved_comm = CommStats(**state["comm"])

    def comm_now() -> CommStats:
        total = saved_comm.copy()
        delta = comm.stats - window
        for k, v in delta.as_dict().items():
            setattr(total, k, getattr(total, k) + v)
        return total

    log = MetricsLog(out / "metrics.jsonl", resume_step=start) if rank == 0 else None
    if start is None:
        state["initial_eval"] = _evaluate(workload, model, optimizer)[workload.metric]
        if log is not None:
            log.write({"step": 0, "wall_s": 0.0, "train_time_s": 0.0, "eval": finite_or_none(state["initial_eval"]),
                       "metric": workload.metric, "bytes_sent": 0, "bytes_recv": 0})
    consecutive_bad, last_loss, eval_result = 0, float("nan"), None
    wall0 = time.perf_counter() - state["wall_s"]
    recent: list[float] = []
    for step in range(first, cfg.steps):
        t0 = time.perf_counter()
        batch = workload.train_batch(step, rank, world)
        loss = _train_step(cfg, model, optimizer, attached, workload, batch)
        if attached.scheduler_takes_loss:
            scheduler.step(loss if math.isfinite(loss) else None)
        else:
            scheduler.step()
        state["train_time_s"] += time.perf_counter() - t0
        if math.isfinite(loss):
            consecutive_bad, last_loss = 0, loss
            recent.append(loss)
        else:
            consecutive_bad += 1
            state["nonfinite_steps"] += 1
            if consecutive_bad >= cfg.max_nonfinite:
                raise TrainingError(
                    f"loss was NaN/Inf for {consecutive_bad} consecutive steps (rank {rank}, step {step}); "
                    "lower optim.lr, enable optim.grad_clip, or check the data"
                )
        done = step + 1
        stats = comm_now()
        bar.update(1, loss=last_loss, tokens_per_s=_items(batch) / max(time.perf_counter() - t0, 1e-9), bytes_sent=stats.bytes_sent)
        if log is not None and (done % cfg.log_every == 0 or done == cfg.steps):
            log.write({
                "step": done, "wall_s": time.perf_counter() - wall0, "train_time_s": state["train_time_s"],
                "loss": finite_or_none(sum(recent) / len(recent)) if recent else None,
                "lr": optimizer.param_groups[0]["lr"], "bytes_sent": stats.bytes_sent, "bytes_recv": stats.bytes_recv,
            })
            recent = []
        if done % cfg.eval_every == 0 or done == cfg.steps:
            eval_result = _evaluate(workload, model, optimizer)
            value = eval_result[workload.metric]
            if state["time_to_target_s"] is None and workload.reached(value):
                state["time_to_target_s"] = state["train_time_s"]
            if log is not None:
                log.write({"step": done, "wall_s": time.perf_counter() - wall0, "train_time_s": state["train_time_s"],
                           "eval": finite_or_none(value), "metric": workload.metric, "bytes_sent": stats.bytes_sent,
                           "bytes_recv": stats.bytes_recv})
        if cfg.ckpt_every and (done % cfg.ckpt_every == 0 or done == cfg.steps):
            state["wall_s"] = time.perf_counter() - wall0
            state["comm"] = comm_now().as_dict()
            checkpoint.save(out, rank, done, {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "algorithm": algo.state_dict(), "lisa": lisa.state_dict() if lisa is not None else {}, "run": dict(state),
            })
        if cfg.stop_at_target and done % cfg.eval_every == 0 and _all_reached(comm, state["time_to_target_s"] is not None):
            break
    bar.close()
    if eval_result is None:
        eval_result = _evaluate(workload, model, optimizer)
    state["wall_s"] = time.perf_counter() - wall0
    record = {
        "rank": rank, "steps": cfg.steps, "final_loss": finite_or_none(last_loss),
        "eval": {k: finite_or_none(v) for k, v in eval_result.items()}, "train_time_s": state["train_time_s"],
        "wall_s": state["wall_s"], "time_to_target_s": state["time_to_target_s"], "nonfinite_steps": state["nonfinite_steps"],
        "initial_eval": finite_or_none(state.get("initial_eval")), "resumed_from": start,
        "skipped_steps": getattr(algo, "skipped_steps", 0), "peak_mem_bytes": peak_mem_bytes(),
        "comm": comm_now().as_dict(), "algorithm": getattr(algo, "report", dict)(),
        "lisa": lisa.report() if lisa is not None else None,
    }
    if log is not None:
        log.close()
    records = _gather_records(comm, record)
    if rank != 0:
        return None
    summary = _summary(cfg, workload, world, records)
    write_json(out / "summary.json", summary)
    if cfg.plot:
        plot_loss(out / "metrics.jsonl", out / "loss.png")
    return summary


def _train_step(cfg: DictConfig, model: torch.nn.Module, optimizer: torch.optim.Optimizer, attached: Attached, workload: Any, batch: Any) -> float:
    """One step; a non-finite loss or gradient never reaches the weights (grads dropped, step skipped)."""
    if attached.forward_only:
        value = float(attached.algorithm.step(lambda: workload.loss(model, batch)))
        # No grads exist, so this is a no-op on the weights; it fires the optimizer's step hooks
        # (LISA counts steps there) and keeps torch's optimizer-before-scheduler order.
        optimizer.step()
        return value
    loss = workload.loss(model, batch)
    value = float(loss.detach())
    ok = math.isfinite(value)
    if ok:
        loss.backward()
        if cfg.optim.grad_clip > 0:
            params = [p for p in model.parameters() if p.grad is not None]
            norm = torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip, foreach=True)
            ok = bool(torch.isfinite(norm))
    if not ok:
        # Grads set to None make optimizer.step() a no-op on the weights while the algorithm's
        # step counter still advances, so this worker stays in lock-step with the others.
        optimizer.zero_grad(set_to_none=True)
        value = float("nan")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return value


def _evaluate(workload: Any, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """Evaluate; optimizers with train()/eval() modes (Schedule-Free) are measured at their eval point."""
    modal = callable(getattr(optimizer, "eval", None)) and callable(getattr(optimizer, "train", None))
    if modal:
        optimizer.eval()
    try:
        return workload.evaluate(model)
    finally:
        if modal:
            optimizer.train()


def _items(batch: Any) -> int:
    first = batch[0] if isinstance(batch, (tuple, list)) else batch
    return int(first.numel()) if isinstance(first, torch.Tensor) else 1


def _all_reached(comm: Comm, reached: bool) -> bool:
    flag = torch.tensor([1.0 if reached else 0.0])
    comm.all_reduce([flag], op="min")
    return bool(flag.item() > 0)


def _gather_records(comm: Comm, record: dict[str, Any]) -> list[dict[str, Any]]:
    """Every worker's end-of-run record (JSON, never pickled); only our own if the group is gone."""
    try:
        blobs = comm.all_gather_bytes(json.dumps(record, allow_nan=False).encode())
    except CommError:
        return [record]
    out = []
    for blob in blobs:
        try:
            out.append(json.loads(blob.decode()))
        except (UnicodeDecodeError, json.JSONDecodeError):
            continue
    return out


def _summary(cfg: DictConfig, workload: Any, world: int, records: list[dict[str, Any]]) -> dict[str, Any]:
    me = records[0]
    values = [r["eval"].get(workload.metric) for r in records if r["eval"].get(workload.metric) is not None]
    final = me["eval"].get(workload.metric)
    return {
        "algorithm": cfg.algo.name, "workload": workload.name, "optimizer": cfg.optim.name, "world_size": world,
        "workers_reporting": len(records), "steps": cfg.steps, "resumed_from": me.get("resumed_from"), "wall_s": me["wall_s"], "train_time_s": me["train_time_s"],
        "final_loss": me["final_loss"],
        "eval": {"metric": workload.metric, "value": final, "initial": me.get("initial_eval"),
                 "mean_over_workers": sum(values) / len(values) if values else None,
                 "target": workload.target, "higher_is_better": workload.higher_is_better},
        "reached_target": me["time_to_target_s"] is not None, "time_to_target_s": me["time_to_target_s"],
        "peak_mem_bytes": max(r["peak_mem_bytes"] for r in records),
        "nonfinite_steps": sum(r["nonfinite_steps"] for r in records), "skipped_steps": max(r["skipped_steps"] for r in records),
        "comm": aggregate_comm(records), "workers": records,
    }
