"""Gradient buckets all-reduced while backward runs (what torch's DistributedDataParallel does), on any
`Comm`: each bucket's non-blocking sum starts as soon as backward has accumulated its last gradient
(``register_post_accumulate_grad_hook``), and the end of backward (a callback queued on the autograd
engine) waits for them all and leaves the *mean* gradient in ``p.grad``, so a user's loop clips and
checks the averaged gradient, as under torch DDP.

Safety rides along at no extra collective: a bucket whose gradients are not finite is sent as zeros
and the worker's flag, one element at the end of the last bucket, is raised; a worker that ran no
backward this step (NaN loss) sends every bucket from `reduce_now` with the flag raised. Every
worker sees the same reduced buffers, so all reach the same verdict: ``ok``, ``flagged`` or
``peer_nonfinite`` (the reduced gradient is not finite: a peer sent NaN with a clean flag).

Buckets follow the reverse of the parameter order (roughly the order backward produces gradients),
one dtype per bucket, and launch strictly in index order so every worker issues the same
collectives in the same order. The layout is rebuilt when the set of trainable parameters changes
(LISA freezes and unfreezes blocks; every worker changes it at the same step).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from dtrain.comm.base import Comm, Handle
from dtrain.comm.flat import like, local, split_like

FIRST_BUCKET_BYTES = 1 << 20  # torch DDP's first bucket: 1 MiB, so the first reduce starts early
BUCKET_BYTES = 25 << 20  # torch DDP's bucket_cap_mb default

OK, FLAGGED, PEER_NONFINITE = "ok", "flagged", "peer_nonfinite"


@dataclass
class _Bucket:
    params: list[torch.Tensor]
    flat: torch.Tensor  # the gradients, then (last bucket only) the flag
    views: list[torch.Tensor]  # one per param, into flat
    waiting: int = 0  # gradients still to come in this backward
    handle: Handle | None = None
    has_flag: bool = False
    index: dict[int, int] = field(default_factory=dict)  # id(param) -> position in params


class GradBuckets:
    """The overlapped mean of the gradients of ``params()`` (the optimizer's parameters, re-read
    so frozen/unfrozen changes are seen). ``verdict`` holds the current step's outcome."""

    def __init__(self, comm: Comm, params: Callable[[], list[torch.Tensor]], *,
                 bucket_bytes: int = BUCKET_BYTES, first_bucket_bytes: int = FIRST_BUCKET_BYTES) -> None:
        self.comm = comm
        self._params = params
        self._caps = (first_bucket_bytes, bucket_bytes)
        self._hooks: dict[int, Any] = {}
        self._layout: tuple[int, ...] | None = None
        self.buckets: list[_Bucket] = []
        self._where: dict[int, _Bucket] = {}
        self._next = 0  # next bucket to launch
        self._armed = False  # inside a backward whose end callback is queued
        self._bad = False  # a local gradient was not finite this step
        self.paused = False  # inside DDP.no_sync(): backward accumulates locally and sends nothing
        # A hierarchical worker's gradients are whole only once its inner reduction (FSDP2's
        # reduce-scatter into DTensor shards, torch DDP's all-reduce) ends with backward: reduce at the step.
        self.at_step = comm.inner_comm is not None
        self.verdict: str | None = None  # None: nothing reduced yet this step

    # -- layout ----------------------------------------------------------------------------
    def sync_layout(self) -> bool:
        """Rebuild the buckets if the trainable parameters changed; True if they did."""
        trainable = [p for p in self._params() if p.requires_grad]
        key = tuple(id(p) for p in trainable)
        if key == self._layout:
            return False
        for p in trainable:
            if id(p) not in self._hooks:
                self._hooks[id(p)] = p.register_post_accumulate_grad_hook(self._on_grad)
        self._layout = key
        self.buckets, self._where = [], {}
        open_: dict[torch.dtype, list[torch.Tensor]] = {}
        sizes: dict[torch.dtype, int] = {}
        for p in reversed(trainable):
            group = open_.setdefault(p.dtype, [])
            group.append(p)
            sizes[p.dtype] = sizes.get(p.dtype, 0) + local(p).numel() * p.element_size()
            if sizes[p.dtype] >= self._caps[0 if not self.buckets else 1]:
                self._close(group)
                open_[p.dtype], sizes[p.dtype] = [], 0
        for group in open_.values():
            if group:
                self._close(group)
        if self.buckets:
            self._add_flag(self.buckets[-1])
        return True

    def _close(self, params: list[torch.Tensor]) -> None:
        flat = torch.zeros(sum(local(p).numel() for p in params), dtype=params[0].dtype, device=params[0].device)
        bucket = _Bucket(params=params, flat=flat, views=split_like(flat, params),
                         index={id(p): i for i, p in enumerate(params)})
        self.buckets.append(bucket)
        for p in params:
            self._where[id(p)] = bucket

    def _add_flag(self, bucket: _Bucket) -> None:
        bucket.flat = torch.zeros(bucket.flat.numel() + 1, dtype=bucket.flat.dtype, device=bucket.flat.device)
        bucket.views = split_like(bucket.flat, bucket.params)
        bucket.has_flag = True

    # -- during backward -------------------------------------------------------------------
    def _on_grad(self, p: torch.Tensor) -> None:
        if self.paused or self.at_step:
            return
        if not self._armed:
            self._arm()
            torch.autograd.Variable._execution_engine.queue_callback(self._end_backward)
        bucket = self._where.get(id(p))
        if bucket is None:  # became trainable after the last layout check: `reduce_now` covers it
            return
        bucket.waiting -= 1
        if bucket.waiting == 0:
            self._launch_ready()

    def _arm(self) -> None:
        self._armed = True
        self._next = 0
        for b in self.buckets:
            b.waiting = sum(1 for p in b.params if p.requires_grad)
            b.handle = None

    def _launch_ready(self) -> None:
        while self._next < len(self.buckets) and self.buckets[self._next].waiting <= 0:
            self._launch(self.buckets[self._next])
            self._next += 1

    def _launch(self, bucket: _Bucket) -> None:
        missing = [v for v, p in zip(bucket.views, bucket.params) if p.grad is None]
        if missing:
            torch._foreach_zero_(missing)
        # A grad already a view of this buffer (zero_grad(set_to_none=False) kept it) is in place.
        pairs = [(v, local(p.grad)) for v, p in zip(bucket.views, bucket.params)
                 if p.grad is not None and local(p.grad).data_ptr() != v.data_ptr()]
        if pairs:
            torch._foreach_copy_([v for v, _ in pairs], [g.detach().reshape(v.shape) for v, g in pairs])
        if bucket.has_flag:
            bucket.flat[-1] = 0
        if not finite(bucket.flat):
            bucket.flat.zero_()  # this worker's non-finite gradient never reaches a peer
            self._bad = True
        if bucket.has_flag and self._bad:
            bucket.flat[-1] = 1
        bucket.handle = self.comm.all_reduce([bucket.flat], op="sum", async_op=True)

    def _end_backward(self) -> None:
        self._armed = False
        for b in self.buckets[self._next:]:
            b.waiting = 0  # parameters unused by this backward contribute zeros
        self._launch_ready()
        self._finish()

    # -- results ---------------------------------------------------------------------------
    def reduce_now(self, *, skipped: bool) -> None:
        """Reduce every bucket from the step hook (no backward ran here, or the layout changed);
        ``skipped`` raises this worker's flag."""
        self._arm()
        self._armed = False
        self._bad = self._bad or skipped
        for b in self.buckets:
            b.waiting = 0
        self._launch_ready()
        self._finish()

    def _finish(self) -> None:
        for b in self.buckets:
            if b.handle is not None:
                b.handle.wait()
                b.handle = None
        flats = [b.flat for b in self.buckets]
        if not flats:
            self.verdict = self.verdict or OK
            return
        flagged = bool(self.buckets[-1].flat[-1] > 0)
        verdict = agreed_verdict(self.comm, PEER_NONFINITE if not finite(*flats) else FLAGGED if flagged else OK)
        if self.verdict not in (None, OK):  # a second backward before the step keeps the first skip
            verdict = self.verdict
        self.verdict = verdict
        if verdict != OK:
            for b in self.buckets:
                for p in b.params:
                    p.grad = None
            return
        torch._foreach_mul_(flats, 1.0 / self.comm.world_size)
        for b in self.buckets:
            for p, v in zip(b.params, b.views):
                if p.requires_grad:
                    p.grad = like(v, p)  # a DTensor parameter's shard: its grad is a DTensor again

    def take_verdict(self) -> str | None:
        """This step's verdict (None if nothing was reduced); resets for the next step."""
        verdict, self.verdict, self._bad = self.verdict, None, False
        return verdict

    def remove(self) -> None:
        for h in self._hooks.values():
            h.remove()
        self._hooks = {}


def agreed_verdict(comm: Comm, verdict: str) -> str:
    """The worst verdict over a sharded worker's processes (each judged its own shard), so they step
    or skip together; as is for a worker of one process."""
    inner = comm.inner_comm
    if inner is None or inner.world_size == 1:
        return verdict
    order = (OK, FLAGGED, PEER_NONFINITE)
    code = torch.tensor([float(order.index(verdict))])
    inner.all_reduce([code], op="max")
    return order[int(code.item())]


def finite(*tensors: torch.Tensor) -> bool:
    """True if every element is finite, by one sum per tensor: NaN and Inf survive a sum, and a sum is a
    single pass (``isfinite().all()`` is many times slower on CPU). Finite values whose sum overflows
    count as non-finite: such a gradient is garbage anyway, and every worker then skips together."""
    sums = [t.sum(dtype=torch.float32) if t.is_floating_point() else t.sum().float() for t in tensors]
    return bool(torch.isfinite(torch.stack(sums)).all())
