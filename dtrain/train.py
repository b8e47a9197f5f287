"""The training loop behind `dtrain train`: one user of the same public APIs a user's loop calls.

`run(cfg)` starts the workers (threads for comm=local, else this process is one worker under
torchrun), trains, evaluates, checkpoints, and returns the summary on rank 0 (None elsewhere).
One worker's run is a `Worker`: `start` (claim out_dir, resume or join), then per step
`train_step`, `log_row`, `maybe_eval`, `maybe_checkpoint`, and `finish` (summary.json).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from dtrain import checkpoint, hierarchy, outcome, run_dir
from dtrain.algorithms.base import AttachContext, Attached, OptimizerHook
from dtrain.comm.base import Comm, CommError, CommStats
from dtrain.config import section_module
from dtrain.device import check_sharing, comm_backend, resolve, to_device
from dtrain.optim import build_optimizer, build_scheduler
from dtrain.plots import plot_loss
from dtrain.report import MetricsLog, Progress, RunNotes, stderr_line, aggregate_comm, finite_or_none, peak_mem_bytes, write_json
from dtrain.guards import NonfiniteGuard, TrainingError, refuse_nonfinite_weights, skipped_updates, warn_noops
from dtrain.run_start import checkpoint_path, one_line, open_run
from dtrain.run_state import RunState
from dtrain.step import Stepper
from dtrain.tensorboard_log import TensorBoardLog


class WorkerStopped(TrainingError):
    """This worker failed; its one-line reason has been printed and told to the other workers."""


def run(cfg: DictConfig) -> dict[str, Any] | None:
    """Train with ``cfg`` (from `dtrain.config.load`); the summary on rank 0, None on other ranks."""
    if cfg.comm.name == "local":
        from dtrain.comm.local import run_local

        n = cfg.comm.workers
        _set_threads(cfg, workers_here=n)
        device = resolve(cfg.device, local=True)  # threads of one process: all on cuda:0 (dtrain.device)
        results = run_local(n, lambda comm: train_worker(cfg, comm, device=device), timeout=cfg.comm.timeout_s)
        return results[0]
    _set_threads(cfg, workers_here=int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    device = resolve(cfg.device)
    comm = _connect(cfg, device)
    try:
        return run_worker(cfg, comm, device=device)
    finally:
        comm.close()


def _connect(cfg: DictConfig, device: torch.device) -> Comm:
    """This process's comm, once the process is pinned to its GPU (nccl and the device mesh use the current one)."""
    if device.type == "cuda":
        if cfg.comm.name == "torch":
            check_sharing(comm_backend(cfg.comm.backend, device), device)
        torch.cuda.set_device(device)
    if hierarchy.enabled(cfg):  # hierarchy hook: a worker of comm.inner_size processes gets the outer comm
        return hierarchy.connect(cfg)
    module = section_module("comm", cfg.comm.name)  # torch's backend=auto follows the device (dtrain.device)
    return module.connect(cfg.comm, device=device) if cfg.comm.name == "torch" else module.connect(cfg.comm)


def run_worker(cfg: DictConfig, comm: Comm, *, device: torch.device | None = None) -> dict[str, Any] | None:
    """`train_worker` as one process of a multi-process job: a failing peer stops this process
    within seconds with the peer's reason, and a failure here is told to the peers."""
    comm.watch_failures(_stop_this_process)
    try:
        return train_worker(cfg, comm, device=device)
    except BaseException as e:
        reason = one_line(e)
        comm.report_failure(reason)  # first: from here on a peer's reason is not printed as ours
        # Said here, not by the caller: the first peer to exit makes torchrun stop this process
        # too, perhaps before the caller could print it (peers poll the reason every 0.5 s).
        stderr_line(f"dtrain: error: {reason}")
        raise WorkerStopped(reason) from e


def _stop_this_process(reason: str) -> None:
    """Another worker failed: leave now with its reason instead of waiting on it in a collective."""
    stderr_line(f"dtrain: error: {reason}")
    os._exit(1)


def _set_threads(cfg: DictConfig, *, workers_here: int) -> None:
    threads = cfg.threads or max(1, (os.cpu_count() or 1) // max(1, workers_here))
    torch.set_num_threads(threads)


def train_worker(cfg: DictConfig, comm: Comm, *, device: torch.device | None = None) -> dict[str, Any] | None:
    """One worker's whole run on ``comm`` and ``device`` (None: cfg.device); the summary on rank 0, None elsewhere."""
    lock = run_dir.RunDirLock(cfg.out_dir, hierarchy.process_rank(comm))  # before anything is written to out_dir
    try:
        return Worker(cfg, comm, device=device).train()
    finally:
        lock.release()


@dataclass
class Parts:
    """What the config builds for one worker, through the same public API a user's loop uses."""

    workload: Any
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    attached: Attached
    scheduler: Any
    lisa: Any
    stepper: Stepper  # one optimizer step: micro-batches, precision, compile (dtrain.step)

    @classmethod
    def build(cls, cfg: DictConfig, comm: Comm, *, device: torch.device | None = None) -> Parts:
        workload = section_module("workload", cfg.workload.name).build(cfg.workload, seed=cfg.seed)
        model = workload.build_model()
        if device is not None and device.type != "cpu":  # the CPU path stays the very same model as before
            model = model.to(device)  # before the optimizer and algorithms: their state is made beside the parameters
        model = hierarchy.wrap_for_run(model, comm, cfg)  # hierarchy hook: FSDP2/DDP inside a worker
        algo = section_module("algo", cfg.algo.name)
        own = getattr(algo, "make_optimizer", None)  # an algorithm that is the optimizer (SPSA) builds itself
        optimizer = (own(cfg.algo, model, comm, lr=cfg.optim.lr, seed=cfg.seed) if own is not None
                     else build_optimizer(cfg.optim, model, **hierarchy.optimizer_kwargs(cfg, comm)))
        ctx = AttachContext(
            model=model, optimizer=optimizer, comm=comm, seed=cfg.seed, total_steps=cfg.steps,
            lr=optimizer.param_groups[0]["lr"], workload=workload,
        )
        lisa = None
        if cfg.lisa is not None:
            # LISA hooks first: at a step where it switches and the outer algorithm syncs, the sync
            # already sees the release, so the frozen blocks' outer state is freed at that sync.
            from dtrain.algorithms.lisa import LISA

            lisa = LISA.attach(cfg.lisa, ctx).algorithm
        attached = algo.attach(cfg.algo, ctx)
        if lisa is not None and isinstance(attached.algorithm, OptimizerHook):  # SPSA keeps no per-parameter state
            lisa.notify(attached.algorithm)
        scheduler = attached.scheduler or build_scheduler(cfg.optim, optimizer, cfg.steps)
        stepper = Stepper(model=model, optimizer=optimizer, attached=attached, workload=workload, comm=comm,
                          precision=cfg.precision, grad_accum=cfg.grad_accum, compile=cfg.compile, grad_clip=cfg.optim.grad_clip)
        return cls(workload, model, optimizer, attached, scheduler, lisa, stepper)

    @property
    def algorithm(self) -> Any:
        return self.attached.algorithm

    def state_dicts(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "algorithm": self.algorithm.state_dict(),
                "lisa": self.lisa.state_dict() if self.lisa is not None else {},
                **({"stepper": stepper} if (stepper := self.stepper.state_dict()) else {})}  # fp16's loss scale

    def load_state_dicts(self, saved: dict[str, Any]) -> None:
        self.model.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        self.algorithm.load_state_dict(saved["algorithm"])
        if self.lisa is not None:
            self.lisa.load_state_dict(saved["lisa"])
        self.stepper.load_state_dict(saved.get("stepper", {}))


class Worker:
    """One worker's run of the loop."""

    def __init__(self, cfg: DictConfig, comm: Comm, *, device: torch.device | None = None) -> None:
        self.cfg, self.comm = cfg, comm
        self.device = device if device is not None else resolve(cfg.device)
        self.rank, self.world = comm.rank, comm.world_size  # hierarchical: the worker's index and the number of workers
        self.lead = hierarchy.is_lead(comm)  # writes the run's files (rank 0; hierarchical: worker 0's process 0)
        self.store = hierarchy.checkpoint_store(comm)  # dtrain.checkpoint, or DCP per worker (hierarchy hook)
        self.out = Path(cfg.out_dir)
        self.notes = RunNotes(self.rank)
        self.parts = Parts.build(cfg, comm, device=self.device)
        warn_noops(cfg, self.world, self.parts.workload, self.notes)
        self.ident = run_dir.identity(cfg, self.world)
        self.state = RunState()
        self.start: int | None = None
        self.done = 0  # optimizer steps trained by the end, resumed ones included
        self.guard = NonfiniteGuard(cfg.max_nonfinite, self.rank)
        self.last_loss, self.recent, self.eval_result = float("nan"), [], None

    # -- start ------------------------------------------------------------------------------
    def begin(self) -> None:
        """Claim out_dir, resume or join, and write the run's own files (rank 0)."""
        self.start, saved = open_run(self.cfg, self.comm, self.ident, self.notes, store=self.store)
        hierarchy.all_decided(self.comm)  # hierarchy hook: no process writes before every one has looked at out_dir
        if self.start is not None:
            run_dir.check_model_shapes(saved["model"], self.parts.model.state_dict(),
                                       where=checkpoint_path(self.cfg, self.rank, self.start, store=self.store))
            self.parts.load_state_dicts(saved)
            self.state.load_state_dict(saved["run"])
        self.comm.activate()  # state loaded: a joiner takes part from here on (a no-op for everyone else)
        if self.lead:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.yaml").write_text(OmegaConf.to_yaml(self.cfg))
            if self.start is None:
                run_dir.write_run_record(self.out, self.ident)
        self.done = self.start or 0
        self.comm_before = self.state.comm.copy()
        self.window = self.comm.stats.copy()  # counters cover training only (setup collectives excluded)
        self.inner_window = self.inner_stats()
        self.log = MetricsLog(self.out / "metrics.jsonl", resume_step=self.start) if self.lead else None
        self.tb = TensorBoardLog(self.out, resume_step=self.start) if self.lead and self.cfg.tensorboard else None
        self.wall0 = time.perf_counter() - self.state.wall_s

    def comm_now(self) -> CommStats:
        return self.comm_before + (self.comm.stats - self.window)

    def inner_stats(self) -> CommStats:
        return self.comm.inner_comm.stats.copy() if self.comm.inner_comm is not None else CommStats()

    def inner_now(self) -> CommStats:
        """Fast-link traffic inside a hierarchical worker (FSDP2/DDP), this process, since training began."""
        return self.state.comm_inner + (self.inner_stats() - self.inner_window)

    # -- the loop ---------------------------------------------------------------------------
    def train(self) -> dict[str, Any] | None:
        self.begin()
        p, cfg = self.parts, self.cfg
        if self.start is None:
            self.state.initial_eval = _evaluate(p.workload, p.model, p.optimizer)[p.workload.metric]
            self.write({"step": 0, "wall_s": 0.0, "train_time_s": 0.0, "eval": finite_or_none(self.state.initial_eval),
                        "metric": p.workload.metric, "bytes_sent": 0, "bytes_recv": 0})
        bar = Progress(enabled=cfg.progress and self.lead, total=cfg.steps, initial=self.start or 0)
        for step in range(self.start or 0, cfg.steps):
            t0 = time.perf_counter()
            batch = hierarchy.run_batch(p.workload.train_batch(step, self.rank, self.world), self.comm)
            if self.device.type != "cpu":  # sliced first (hierarchy), so only this process's part is copied
                batch = to_device(batch, self.device)
            self.train_step(step, batch)
            done = self.done = step + 1
            bar.update(1, loss=self.last_loss, tokens_per_s=_items(batch) / max(time.perf_counter() - t0, 1e-9),
                       bytes_sent=self.comm_now().bytes_sent)
            self.log_row(done)
            self.maybe_eval(done)
            self.maybe_checkpoint(done)
            self.comm.serve_state(lambda: {"step": done, **self.snapshot()})
            if cfg.stop_at_target and done % cfg.eval_every == 0 and _all_reached(self.comm, self.state.time_to_target_s is not None):
                break
        bar.close()
        return self.finish()

    def train_step(self, step: int, batch: Any) -> None:
        p = self.parts
        t0 = time.perf_counter()
        skipped_before = skipped_updates(p.algorithm)
        talked_before = (self.comm.stats.collectives, self.comm.stats.messages)
        loss = p.stepper(batch)
        if p.attached.scheduler_takes_loss:
            p.scheduler.step(loss if math.isfinite(loss) else None)
        else:
            p.scheduler.step()
        self.state.train_time_s += time.perf_counter() - t0
        if math.isfinite(loss):
            self.last_loss = loss
            self.recent.append(loss)
        else:
            self.state.nonfinite_steps += 1
        self.guard.observe(step, loss, skipped=skipped_updates(p.algorithm) > skipped_before,
                           talked=(self.comm.stats.collectives, self.comm.stats.messages) != talked_before)

    def write(self, row: dict[str, Any]) -> None:
        if self.log is not None:
            self.log.write(row)
        if self.tb is not None:
            self.tb.write(row)

    def log_row(self, done: int) -> None:
        if done % self.cfg.log_every and done != self.cfg.steps:
            return
        stats = self.comm_now()
        self.write({"step": done, "wall_s": time.perf_counter() - self.wall0, "train_time_s": self.state.train_time_s,
                    "loss": finite_or_none(sum(self.recent) / len(self.recent)) if self.recent else None,
                    "lr": self.parts.optimizer.param_groups[0]["lr"], "bytes_sent": stats.bytes_sent,
                    "bytes_recv": stats.bytes_recv, **self.inner_row()})
        self.recent = []

    def maybe_eval(self, done: int) -> None:
        if done % self.cfg.eval_every and done != self.cfg.steps:
            return
        p = self.parts
        self.eval_result = _evaluate(p.workload, p.model, p.optimizer)
        value = self.eval_result[p.workload.metric]
        if self.state.time_to_target_s is None and p.workload.reached(value):
            self.state.time_to_target_s = self.state.train_time_s
        stats = self.comm_now()
        self.write({"step": done, "wall_s": time.perf_counter() - self.wall0, "train_time_s": self.state.train_time_s,
                    "eval": finite_or_none(value), "metric": p.workload.metric, "bytes_sent": stats.bytes_sent,
                    "bytes_recv": stats.bytes_recv, **self.inner_row()})

    def snapshot(self) -> dict[str, Any]:
        """Everything a checkpoint (or a joining peer) needs to continue this worker's trajectory."""
        self.state.wall_s = time.perf_counter() - self.wall0
        self.state.comm = self.comm_now()
        self.state.comm_inner = self.inner_now()
        return {**self.parts.state_dicts(), "run": self.state.state_dict()}

    def inner_row(self) -> dict[str, Any]:
        return {"inner_bytes_sent": self.inner_now().bytes_sent} if self.comm.inner_comm is not None else {}

    def maybe_checkpoint(self, done: int) -> None:
        every = self.cfg.ckpt_every
        if not every or (done % every and done != self.cfg.steps):
            return
        refuse_nonfinite_weights(self.parts.model, self.rank, done)  # a bad checkpoint must never rotate out a good one
        self.store.save(self.out, self.rank, done, {"identity": self.ident, **self.snapshot()})

    # -- the end ------------------------------------------------------------------------------
    def finish(self) -> dict[str, Any] | None:
        p, cfg = self.parts, self.cfg
        if self.eval_result is None:
            self.eval_result = _evaluate(p.workload, p.model, p.optimizer)
        self.state.wall_s = time.perf_counter() - self.wall0
        s = self.state
        record = {
            "rank": self.rank, "device": str(self.device), "steps": cfg.steps, "final_loss": finite_or_none(self.last_loss),
            "eval": {k: finite_or_none(v) for k, v in self.eval_result.items()}, "train_time_s": s.train_time_s,
            "wall_s": s.wall_s, "time_to_target_s": s.time_to_target_s, "nonfinite_steps": s.nonfinite_steps,
            "initial_eval": finite_or_none(s.initial_eval), "resumed_from": self.start,
            "skipped_steps": getattr(p.algorithm, "skipped_steps", 0), "peak_mem_bytes": peak_mem_bytes(),
            "comm": self.comm_now().as_dict(), "algorithm": getattr(p.algorithm, "report", dict)(),
            **({"comm_inner": self.inner_now().as_dict()} if self.comm.inner_comm is not None else {}),
            "lisa": p.lisa.report() if p.lisa is not None else None, "warnings": self.notes.items,
        }
        if self.log is not None:
            self.log.close()
        if self.tb is not None:
            self.tb.close()
        records = _gather_records(self.comm, record)
        if not self.lead:
            return None
        summary = _summary(cfg, p.workload, self.world, records)
        summary.update(hierarchy.summary_fields(self.comm, records))
        # a sharded worker's model runs only with all its processes, which have left by now
        summary.update(outcome.end_facts(p.workload, p.model, p.optimizer, workers=self.world, steps=self.done,
                                         seed=cfg.seed, can_sample=not hierarchy.enabled(cfg)))
        write_json(self.out / "summary.json", summary)
        if cfg.plot:
            plot_loss(self.out / "metrics.jsonl", self.out / "loss.png", algorithm=" + ".join(summary["algorithms"]),
                      workload=summary["workload"], workers=self.world)
        return summary


def _evaluate(workload: Any, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """Evaluate; optimizers with train()/eval() modes (Schedule-Free) are measured at their eval point."""
    with outcome.eval_point(optimizer):
        return workload.evaluate(model)


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
        "algorithm": cfg.algo.name, "algorithms": (["lisa"] if cfg.lisa is not None else []) + [cfg.algo.name],
        "workload": workload.name, "optimizer": cfg.optim.name, "world_size": world, "device": me.get("device"),
        "workers_reporting": len(records), "steps": cfg.steps, "resumed_from": me.get("resumed_from"), "wall_s": me["wall_s"], "train_time_s": me["train_time_s"],
        "final_loss": me["final_loss"],
        "eval": {"metric": workload.metric, "value": final, "initial": me.get("initial_eval"),
                 "mean_over_workers": sum(values) / len(values) if values else None,
                 "target": workload.target, "higher_is_better": workload.higher_is_better},
        "reached_target": me["time_to_target_s"] is not None, "time_to_target_s": me["time_to_target_s"],
        "peak_mem_bytes": max(r["peak_mem_bytes"] for r in records),
        "nonfinite_steps": sum(r["nonfinite_steps"] for r in records), "skipped_steps": max(r["skipped_steps"] for r in records),
        "comm": aggregate_comm(records),
        "warnings": list(dict.fromkeys(w for r in records for w in r.get("warnings", []))), "workers": records,
    }
