"""One optimizer step of `dtrain train`: micro-batches, autocast precision, fp16 loss scaling, compile.

Run-level keys (in `dtrain.config.RunConfig`, checked by `check`):

- ``precision: fp32 | bf16 | fp16`` — forward and loss under ``torch.autocast`` in that dtype; the
  parameters (the master weights the optimizer and the algorithms see) stay fp32. fp16 scales the
  loss with ``torch.amp.GradScaler`` and needs CUDA. Evaluation runs in fp32, so a validation metric
  means the same at every precision.
- ``grad_accum: A`` — the worker's batch is split along dim 0 into A equal micro-batches, each one's
  loss scaled by 1/A, gradients summed locally, one optimizer step (and one reduction: under DDP every
  micro-batch but the last runs inside `DDP.no_sync()`). The trajectory does not depend on A, only the
  memory a forward needs does (as with ``comm.inner_size``): ``workload.batch_size`` must divide by A.
- ``compile: true`` — the forward runs through ``torch.compile(model)``; the algorithms, the
  optimizer, checkpoints and evaluation keep the original module and its parameters.

A non-finite loss or gradient never reaches the weights: the step's grads are dropped and
``optimizer.step()`` still runs (a no-op update), so the algorithm's counter stays in lock-step.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch

from dtrain import hierarchy
from dtrain.algorithms.base import Attached

PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def check(cfg: Any) -> None:
    """The run-level step keys; raises ValueError with one line naming the key."""
    if cfg.precision not in PRECISIONS:
        raise ValueError(f"precision must be fp32, bf16 or fp16, got {cfg.precision!r}")
    if cfg.precision == "fp16" and not torch.cuda.is_available():
        raise ValueError("precision=fp16 needs CUDA (its loss scaling is for GPUs; CPU fp16 autocast is slow and "
                         "unscaled); use precision=bf16 on CPU")
    if cfg.grad_accum < 1:
        raise ValueError(f"grad_accum must be >= 1, got {cfg.grad_accum}")
    batch = cfg.workload.get("batch_size", None)
    if cfg.grad_accum > 1 and isinstance(batch, int) and batch % cfg.grad_accum:
        raise ValueError(f"grad_accum={cfg.grad_accum} must divide workload.batch_size={batch} (the batch is split into "
                         "grad_accum equal micro-batches)")
    if cfg.algo.name == "spsa" and cfg.grad_accum > 1:
        raise ValueError("grad_accum is ignored under algo.name=spsa (forward passes only, no gradients to accumulate); remove it")
    if hierarchy.enabled(cfg):
        for key, off in (("precision", "fp32"), ("grad_accum", 1), ("compile", False)):
            if cfg[key] != off:
                hint = " (parallel.mixed_precision=bf16 computes in bf16 under FSDP2)" if key == "precision" else ""
                raise ValueError(f"{key}={cfg[key]} is not supported with hierarchical workers (parallel.inner="
                                 f"{cfg.parallel.inner}) yet; remove it{hint}")


def split(batch: Any, parts: int) -> list[Any]:
    """``batch`` as ``parts`` equal micro-batches along dim 0 (non-tensor items are shared by all)."""
    return [hierarchy.batch_part(batch, parts, i, key="grad_accum") for i in range(parts)]


class Stepper:
    """``stepper(batch) -> loss``: one optimizer step on a worker's batch (the loss as a float, NaN if skipped)."""

    def __init__(self, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer, attached: Attached, workload: Any,
                 comm: Any = None, precision: str = "fp32", grad_accum: int = 1, compile: bool = False,
                 grad_clip: float = 0.0) -> None:
        if precision not in PRECISIONS or grad_accum < 1:
            raise ValueError(f"precision must be one of {sorted(PRECISIONS)} and grad_accum >= 1, got {precision!r}, {grad_accum}")
        self.model, self.optimizer, self.attached, self.workload = model, optimizer, attached, workload
        self.grad_accum, self.grad_clip = grad_accum, grad_clip
        # only the forward goes through the compiled wrapper: its parameters are the module's own
        self.forward_model = torch.compile(model) if compile else model
        self.dtype = PRECISIONS[precision]
        first = next(model.parameters(), None)
        self.device_type = first.device.type if first is not None else "cpu"
        self.scaler = torch.amp.GradScaler(self.device_type) if precision == "fp16" else None
        # hierarchy hook: a worker's processes backward together (FSDP2/DDP collectives) and agree on the norm
        self.grouped = comm is not None and getattr(comm, "inner_comm", None) is not None
        self.comm = comm

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def loss(self, batch: Any) -> torch.Tensor:
        with self.autocast():
            return self.workload.loss(self.forward_model, batch)

    @contextlib.contextmanager
    def _quiet(self, last: bool) -> Iterator[None]:
        """Every micro-batch's backward but the last sends nothing (DDP's buckets wait for the sum)."""
        no_sync = getattr(self.attached.algorithm, "no_sync", None)
        if last or no_sync is None:
            yield
        else:
            with no_sync():
                yield

    def __call__(self, batch: Any) -> float:
        optimizer = self.optimizer
        if self.attached.forward_only:  # the algorithm is the optimizer (SPSA): its step runs the forwards and fires its hooks
            return float(optimizer.step(lambda: self.loss(batch)))
        micro = split(batch, self.grad_accum)
        values: list[float] = []
        ok = True
        for i, part in enumerate(micro):
            with self._quiet(i == len(micro) - 1):
                loss = self.loss(part)
                value = float(loss.detach())
                values.append(value)
                if not math.isfinite(value) and not self.grouped:
                    ok = False  # no more backwards: the step is skipped on this worker
                    break
                scaled = loss.float() / self.grad_accum if self.grad_accum > 1 else loss
                (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
        value = sum(values) / len(values)  # equal micro-batches: the mean of their means is the batch's
        unscaled = False
        skipped_before = int(getattr(self.attached.algorithm, "skipped_steps", 0))
        if self.grouped:  # a NaN loss still backwards (FSDP2/DDP collectives); the worker's processes agree to skip
            ok, value = hierarchy.agree_step(list(self.model.parameters()), self.grad_clip, self.comm, value)
        elif ok:
            if self.scaler is not None:
                self.scaler.unscale_(optimizer)  # clipping and the finiteness check see the true gradient
                unscaled = True
            ok = self._clip_and_check()
        if not ok:
            # Grads set to None make optimizer.step() a no-op on the weights while the algorithm's
            # step counter still advances, so this worker stays in lock-step with the others.
            optimizer.zero_grad(set_to_none=True)
            value = float("nan")
        optimizer.step()  # never scaler.step: it would skip the algorithm's hooks on an overflow
        if self.scaler is not None:
            self._update_scale(skipped=not ok or int(getattr(self.attached.algorithm, "skipped_steps", 0)) > skipped_before,
                               unscaled=unscaled)
        optimizer.zero_grad(set_to_none=True)
        return value

    def _update_scale(self, *, skipped: bool, unscaled: bool) -> None:
        """Halve the loss scale whenever the update was skipped, grow it as GradScaler does otherwise.
        DDP replaces a worker's overflowed gradient by zeros and a flag, so the scaler itself may see
        no inf while every worker skips: the skip (agreed by all) is the signal, so that under DDP
        every worker keeps the same scale and the mean never mixes gradients of different scales."""
        if skipped:
            self.scaler.update(self.scaler.get_scale() * self.scaler.get_backoff_factor())
        elif unscaled:
            self.scaler.update()

    def _clip_and_check(self) -> bool:
        params = [p for p in self.model.parameters() if p.grad is not None]
        if self.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, self.grad_clip, foreach=True)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True) if params else torch.zeros(())
        return bool(torch.isfinite(norm))  # a finite loss can still have Inf/NaN gradients

    def state_dict(self) -> dict[str, Any]:
        return {"scaler": self.scaler.state_dict()} if self.scaler is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
