"""DDP baseline: gradients averaged over all workers before every optimizer step."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from dtrain.algorithms.base import Algorithm
from dtrain.algorithms.compress import DEFAULT_BLOCK, TOPK_DEFAULTS, check_compression
from dtrain.algorithms.ddp_buckets import FIRST_BUCKET_BYTES, FLAGGED, OK, PEER_NONFINITE, GradBuckets, agreed_verdict, finite
from dtrain.algorithms.outer_reduce import Compressor, start_mean
from dtrain.algorithms.robust import DEFAULT_TRIM, Options, Tracker, aggregate, check_options, common_dtype
from dtrain.comm.base import Comm


@dataclass
class Config:
    name: str = "ddp"
    broadcast_init: bool = True  # start every worker from rank 0's weights
    robust: str = "none"  # none | trimmed_mean | median (coordinate-wise, over every worker's gradient)
    robust_trim: float = DEFAULT_TRIM  # trimmed_mean: fraction dropped at each end
    robust_norm_bound: float = 0.0  # 0 = off; else clip a gradient to this multiple of the median gradient norm
    bucket_mb: float = 25.0  # gradient bucket size (torch DDP's bucket_cap_mb); the first bucket is at most 1 MiB
    compression: str = "none"  # none | bf16 | int8 | int4 | topk: the gradient's wire format (reduced at the step)
    error_feedback: bool = False  # carry what compression dropped into the next step's gradient
    error_feedback_decay: float = 1.0  # β: the share of the unsent residual kept each round (SparseLoCo: 0.95)
    block_size: int = DEFAULT_BLOCK  # int8/int4: elements per fp32 scale
    topk_density: float = TOPK_DEFAULTS["topk_density"]  # topk: fraction of each chunk sent
    topk_chunk: int = TOPK_DEFAULTS["topk_chunk"]  # topk: elements per chunk
    topk_value_bits: int = TOPK_DEFAULTS["topk_value_bits"]  # topk: 2 or 4 bits per kept value

    def validate(self) -> None:
        check_options(self.robust, self.robust_trim, self.robust_norm_bound)
        if not self.bucket_mb > 0:
            raise ValueError(f"algo.bucket_mb must be > 0, got {self.bucket_mb}")
        check_compression(self)
        if self.compression != "none" and (self.robust != "none" or self.robust_norm_bound > 0):
            raise ValueError(f"algo.compression={self.compression} cannot be combined with robust aggregation, which "
                             "gathers every worker's full gradient; drop one of them")


validate = Config.validate  # dtrain.config calls it on the algo section


class DDP(Algorithm):
    """The mean of the gradients over all workers before every update: ``DDP(optimizer, comm, cfg=None,
    **overrides)`` with the options of `Config`. As torch's DistributedDataParallel does, gradients
    are all-reduced in buckets while backward runs (`dtrain.algorithms.ddp_buckets`: each bucket's
    non-blocking all-reduce starts when its last gradient is accumulated), and when ``backward()``
    returns ``p.grad`` holds the mean, so the loop's clipping sees the averaged gradient. Works on
    any comm (torch, local, hivemind); the step hook settles what backward could not.

    A worker whose gradients are all missing (it skipped backward on a NaN loss) or non-finite
    contributes zeros and raises a flag carried in the last bucket, so every worker learns of it
    from the same all-reduces and all of them skip the update together: no extra collective and
    no worker left waiting. The *reduced* buffers are checked too (a peer may send NaN or values
    that overflow the sum): every worker holds the same reduced buffers, so all skip together.

    Skips are counted by reason: ``flagged_steps`` (a worker raised the flag) and
    ``peer_nonfinite_steps`` (the reduced gradient was not finite); ``skipped_steps`` is their sum.

    With ``robust`` or ``robust_norm_bound`` set, every worker's gradient is all-gathered instead
    (N-1 model-sized messages out per worker, against a ring all-reduce's ~2) and aggregated by
    `dtrain.algorithms.robust` from the same rows on every worker, so replicas stay identical
    (the norm bound's reference is the median gradient norm, which they share).
    A worker that raised its flag is left out of that step's aggregate; a peer whose data is
    malformed or non-finite is dropped and named in ``report()["robust"]``.

    With ``compression`` set, the gradient goes through the codec of `dtrain.algorithms.compress`
    (optionally with error feedback) at the step instead of in buckets during backward (a compressed
    payload is encoded whole; codecs that cannot be summed are all-gathered and decoded in fp32, see
    the cost model in `dtrain.comm.base`). A worker that skipped its backward or holds a non-finite
    gradient sends NaN, so every worker's mean is non-finite and all skip together; such a step gives
    its error-feedback input back (`Compressor.rollback`).
    """

    Config = Config

    def __init__(self, optimizer: torch.optim.Optimizer, comm: Comm, cfg: Config | None = None, **overrides: Any) -> None:
        super().__init__(optimizer, comm, cfg, **overrides)
        self.robust = Options(self.cfg.robust, self.cfg.robust_trim, self.cfg.robust_norm_bound)
        self.flagged_steps = 0
        self.peer_nonfinite_steps = 0
        self.tracker = Tracker("ddp", self.robust)
        if self.cfg.broadcast_init:
            with torch.no_grad():
                comm.broadcast(self.params, src=0)
        self.compressor = Compressor.of(self.cfg) if self.cfg.compression != "none" else None
        # robust aggregation and compression need every worker's whole gradient at once: both act at the step
        cap = max(1, int(self.cfg.bucket_mb * 2**20))
        self.buckets = (None if self.robust.active or self.compressor is not None else
                        GradBuckets(comm, lambda: self.params, bucket_bytes=cap, first_bucket_bytes=min(cap, FIRST_BUCKET_BYTES)))
        if self.buckets is not None:
            self.buckets.sync_layout()

    def before_step(self) -> None:
        params = [p for p in self.params if p.requires_grad]
        if not params:
            return
        if self.buckets is not None:
            self._settle(params)
            return
        if self.compressor is not None:
            self._compressed_mean(params)
            return
        grads = [p.grad for p in params]
        # All grads None: this worker skipped its backward (NaN loss). Some None: unused params.
        bad = all(g is None for g in grads)
        # The flag rides in the first parameter's dtype, so a one-dtype model stays one buffer.
        flag = torch.zeros(1, dtype=params[0].dtype, device=params[0].device)
        # Each grad is reduced in place in its own dtype (the comm fuses one buffer per dtype).
        parts = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)] + [flag]
        if bad or not _finite(parts):
            torch._foreach_zero_(parts)
            flag.fill_(1.0)
        mean = self._robust_mean(parts)
        if mean is None:
            return
        for p, g in zip(params, mean):
            p.grad = g.view_as(p)

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Backward passes inside accumulate gradients locally and send nothing, as torch DDP's
        ``no_sync``: for gradient accumulation run every micro-batch but the last inside it; the last
        backward (outside) reduces the accumulated sum, so a step costs the same collectives."""
        if self.buckets is None:  # robust aggregation gathers at the step anyway
            yield
            return
        self.buckets.paused = True
        try:
            yield
        finally:
            self.buckets.paused = False

    def _settle(self, params: list[torch.Tensor]) -> None:
        """The step's verdict from the buckets; reduced here if no backward did it on this worker
        (it skipped backward: its flag goes up) or the trainable parameters changed since."""
        changed = self.buckets.sync_layout()
        verdict = self.buckets.verdict
        if verdict is None or (changed and verdict == OK):
            self.buckets.reduce_now(skipped=all(p.grad is None for p in params))
        verdict = self.buckets.take_verdict()
        if verdict != OK:
            self._skip(verdict)

    def after_step(self) -> None:
        if self.buckets is not None:
            self.buckets.sync_layout()  # a freeze/unfreeze by an earlier hook (LISA) counts from the next backward

    def remove(self) -> None:
        super().remove()
        if self.buckets is not None:
            self.buckets.remove()

    def _skip(self, reason: str) -> None:
        if reason == FLAGGED:
            self.flagged_steps += 1
        else:
            self.peer_nonfinite_steps += 1
        self.skip_update()

    def _compressed_mean(self, params: list[torch.Tensor]) -> None:
        """The mean gradient through the codec into ``p.grad``, or a skip on every worker alike."""
        grads = [p.grad for p in params]
        flagged = all(g is None for g in grads)
        parts = [torch.zeros_like(p) if g is None else g.detach().clone() for p, g in zip(params, grads)]
        if flagged or not _finite(parts):
            flagged = True
            for t in parts:
                t.fill_(float("nan"))  # every worker's mean turns non-finite: all skip this step
        pending = start_mean(self.comm, self.compressor, parts, "grad")
        pending.wait_into()
        verdict = agreed_verdict(self.comm, FLAGGED if flagged else OK if _finite(parts) else PEER_NONFINITE)
        for key in pending.keys:
            (self.compressor.settle if verdict == OK else self.compressor.rollback)(key)
        if verdict != OK:
            self._skip(verdict)
            return
        for p, g in zip(params, parts):
            p.grad = g

    def _robust_mean(self, parts: list[torch.Tensor]) -> list[torch.Tensor] | None:
        """The robust aggregate of the gradients (``parts`` without the trailing flag) of the
        workers that did not flag, one tensor per gradient (None: skip)."""
        gathered = self.comm.all_gather(parts, skip_bad=True)
        grads = parts[:-1]
        dtype = common_dtype(grads)  # the estimators work on one row per worker: one dtype
        rows, ranks, dropped = [], [], []
        for rank, got in enumerate(gathered):
            if not got:
                if rank in self.comm.peers():
                    dropped.append(rank)
                continue
            if got[-1].item() == 0:  # a flagged worker skipped this step: not a bad peer
                rows.append(torch.cat([g.reshape(-1).to(dtype) for g in got[:-1]]))
                ranks.append(rank)
        where = f"step {self.step}"
        self.tracker.note("dropped", dropped, rank=self.comm.rank, where=where)
        if not rows:
            self._skip(FLAGGED)
            return None
        result = aggregate(torch.stack(rows), self.robust)
        self.tracker.round(result, ranks, rank=self.comm.rank, where=where)
        if not bool(torch.isfinite(result.value).all()):  # finite rows can still overflow
            self._skip(PEER_NONFINITE)
            return None
        out, offset = [], 0
        for g in grads:
            out.append(result.value[offset : offset + g.numel()].view_as(g).to(g.dtype))
            offset += g.numel()
        return out

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "flagged_steps": self.flagged_steps,
                "peer_nonfinite_steps": self.peer_nonfinite_steps, "robust": self.tracker.state_dict(),
                "compressor": self.compressor.state_dict() if self.compressor is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.flagged_steps = int(state.get("flagged_steps", 0))
        self.peer_nonfinite_steps = int(state.get("peer_nonfinite_steps", 0))
        self.tracker.load_state_dict(state.get("robust"))
        if self.compressor is not None:
            self.compressor.load_state_dict(state.get("compressor"))

    def report(self) -> dict[str, Any]:
        out: dict[str, Any] = {**super().report(), "flagged_steps": self.flagged_steps,
                               "peer_nonfinite_steps": self.peer_nonfinite_steps}
        if self.robust.active:
            out["robust"] = self.tracker.report()
        return out


def _finite(tensors: list[torch.Tensor]) -> bool:
    return finite(*tensors)  # one host sync for the whole list


attach = DDP.attach  # what `dtrain train` calls: DDP(ctx.optimizer, ctx.comm, cfg.algo)
