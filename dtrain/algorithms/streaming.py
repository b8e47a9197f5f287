"""Streaming DiLoCo (Douillard et al. 2025): DiLoCo synced fragment by fragment, with overlap.

The parameters are split into P fragments (`dtrain.algorithms.fragments`; ``fragments``: P runs
of equal element count in the optimizer's parameter order, cutting tensors where needed; or
``fragment_paths``: one entry per fragment, each a comma-separated list of module-path prefixes). Fragment p's outer step is due at the steps t
with t ≡ p·H/P (mod H), so one fragment is on the wire at a time and the peak bytes of any one
step fall by P. At t the worker computes Δ_p = φ_p − θ_p, starts its (non-blocking) reduction and
keeps training; at t + τ (``overlap_steps``) it waits for the mean, steps φ_p ← OuterSGD_p(φ_p,
mean Δ_p) with the fragment's own outer optimizer, and mixes θ_p ← α·θ_p + (1 − α)·φ_p
(``mix_alpha``), keeping α of what it learnt meanwhile. With P = 1, τ = 0, α = 0 and no
compression this is DiLoCo, bit for bit.

Compression and error feedback are DiLoCo's (`dtrain.algorithms.compress`, one residual per
fragment and dtype group). A mean that is not finite (a peer's NaN, a payload that does not
decode) skips that fragment's outer step on every worker alike; θ_p is still mixed towards the
unchanged φ_p. A reduction in flight at a checkpoint is saved with what this worker sent, and a
resume re-issues it, so the run continues exactly. When the run length is known (``total_steps``,
passed by `attach`), the last step waits for every reduction still in flight.

``outer_device="cpu"`` keeps φ, the outer momentum and Δ in host memory (pinned where CUDA exists):
the outer step then costs the accelerator no memory (see `outer_state.OuterState`).

``StreamingDiLoCo(optimizer, comm, cfg=None, *, model=None, total_steps=None, **overrides)``;
``model`` is needed only for ``fragment_paths`` (parameter names).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from dtrain.algorithms.base import Algorithm, AttachContext, Attached, all_finite, check_outer_step
from dtrain.algorithms.compress import DEFAULT_BLOCK, TOPK_DEFAULTS, check_compression
from dtrain.algorithms.outer_reduce import Compressor, PendingMean, resume_mean, start_mean
from dtrain.algorithms.fragments import check_schedule, fragments_of
from dtrain.algorithms.outer_state import OUTER_DEVICES, OuterState
from dtrain.comm.base import Comm


@dataclass
class Config:
    name: str = "streaming_diloco"
    sync_every: int = 100  # H: each fragment's outer step comes every H inner steps
    outer_lr: float = 0.7
    outer_momentum: float = 0.9
    nesterov: bool = True
    fragments: int = 4  # P
    fragment_paths: list[str] = field(default_factory=list)  # per fragment "prefix,prefix"; [] = even split by size
    overlap_steps: int = 1  # τ: inner steps between starting a fragment's reduction and applying it
    mix_alpha: float = 0.5  # α: θ ← α·θ_local + (1 − α)·φ_global when a fragment is applied
    broadcast_init: bool = True
    compression: str = "none"  # none | bf16 | int8 | int4 | topk (dtrain.algorithms.compress)
    error_feedback: bool = False
    error_feedback_decay: float = 1.0  # β: the share of the unsent residual kept each round (SparseLoCo: 0.95)
    block_size: int = DEFAULT_BLOCK
    topk_density: float = TOPK_DEFAULTS["topk_density"]
    topk_chunk: int = TOPK_DEFAULTS["topk_chunk"]
    topk_value_bits: int = TOPK_DEFAULTS["topk_value_bits"]
    outer_device: str = "same"  # same (the parameters' device) | cpu (φ and momentum in host memory)

    def validate(self) -> None:
        """One-line ValueError naming the key; works on a DictConfig section too (attributes only)."""
        check_outer_step(self)
        if self.nesterov and self.outer_momentum == 0:
            raise ValueError("algo.nesterov=true needs algo.outer_momentum > 0 (set algo.nesterov=false)")
        check_schedule(self)
        check_compression(self)
        if self.outer_device not in OUTER_DEVICES:
            raise ValueError(f"algo.outer_device must be one of {list(OUTER_DEVICES)}, got {self.outer_device!r}")


validate = Config.validate  # dtrain.config calls it on the algo section


class StreamingDiLoCo(Algorithm):
    """See the module docstring. ``report()`` adds per-fragment outer steps and skips."""

    Config = Config

    def __init__(self, optimizer: torch.optim.Optimizer, comm: Comm, cfg: Config | None = None, *,
                 model: torch.nn.Module | None = None, total_steps: int | None = None, **overrides: Any) -> None:
        super().__init__(optimizer, comm, cfg, **overrides)
        self.total_steps = total_steps
        params = self.params
        self.fragments = fragments_of(params, self.cfg.fragments, self.cfg.fragment_paths, model)
        if self.cfg.broadcast_init:
            with torch.no_grad():
                comm.broadcast(params, src=0)
        self.outer = OuterState(params, self.cfg.outer_device, self.fragments)
        self.outer_optimizers = [
            torch.optim.SGD(self.outer.views[p], lr=self.cfg.outer_lr, momentum=self.cfg.outer_momentum,
                            nesterov=self.cfg.nesterov)
            for p in range(len(self.fragments))
        ]
        self.compressor = Compressor.of(self.cfg)
        self.inflight: dict[int, tuple[int, PendingMean]] = {}  # fragment -> (apply at step, reduction)
        self.fragment_syncs = [0] * len(self.fragments)  # outer steps applied, per fragment
        self.fragment_skips = [0] * len(self.fragments)  # outer steps skipped on every worker (mean not finite)
        self.outer_blocked_s = 0.0  # seconds blocked starting and finishing the fragments' reductions

    @property
    def outer_syncs(self) -> int:
        return sum(self.fragment_syncs)

    @property
    def skipped_syncs(self) -> int:
        return sum(self.fragment_skips)

    @classmethod
    def attach(cls, cfg: Any, ctx: AttachContext) -> Attached:
        return Attached(algorithm=cls(ctx.optimizer, ctx.comm, cfg, model=ctx.model, total_steps=ctx.total_steps))

    def due(self, step: int) -> int | None:
        """The fragment whose reduction starts after inner step ``step`` (t ≡ p·H/P mod H), if any."""
        h, stride = self.cfg.sync_every, self.cfg.sync_every // len(self.fragments)
        offset = step % h
        return offset // stride if step > 0 and offset % stride == 0 else None

    def after_step(self) -> None:
        t = self.step
        last = self.total_steps is not None and t >= self.total_steps
        for p in sorted(self.inflight, key=lambda q: (self.inflight[q][0], q)):
            if self.inflight[p][0] <= t or last:
                self._apply(p)
        p = self.due(t)
        if p is not None:
            self._start(p, t)
            if self.cfg.overlap_steps == 0 or last:
                self._apply(p)

    @torch.no_grad()
    def _start(self, p: int, t: int) -> None:
        if p in self.inflight:  # cannot happen with overlap_steps < sync_every; kept as a guard
            self._apply(p)
        deltas = self.outer.deltas(self.params, p)
        blocked = self.comm.stats.blocked_s
        self.inflight[p] = (t + self.cfg.overlap_steps, start_mean(self.comm, self.compressor, deltas, f"frag{p}"))
        self.outer_blocked_s += self.comm.stats.blocked_s - blocked

    @torch.no_grad()
    def _apply(self, p: int) -> None:
        _, pending = self.inflight.pop(p)
        blocked = self.comm.stats.blocked_s
        pending.wait_into()
        self.outer_blocked_s += self.comm.stats.blocked_s - blocked
        # Check the reduced Δ, never only our own: a peer's NaN arrives in the mean; every worker
        # holds the same mean, so every worker skips together.
        if all_finite(self.comm, pending.targets):  # a sharded worker's processes agree (one inner reduction)
            self.outer_optimizers[p].step()
            self.fragment_syncs[p] += 1
            for key in pending.keys:
                self.compressor.settle(key)
        else:
            self.fragment_skips[p] += 1
            for key in pending.keys:
                self.compressor.rollback(key)
        self.outer.mix_into(self.params, p, self.cfg.mix_alpha)

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "fragment_syncs": list(self.fragment_syncs), "fragment_skips": list(self.fragment_skips),
            "outer_params": [phi.detach().clone() for phi in self.outer.phi],
            "outer_optimizers": [opt.state_dict() for opt in self.outer_optimizers],
            "compressor": self.compressor.state_dict(),
            "inflight": {int(p): {"apply_at": at, **pending.state_dict()} for p, (at, pending) in self.inflight.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.fragment_syncs = [int(x) for x in state["fragment_syncs"]]
        self.fragment_skips = [int(x) for x in state["fragment_skips"]]
        if len(self.fragment_syncs) != len(self.fragments):
            raise ValueError(f"streaming_diloco checkpoint has {len(self.fragment_syncs)} fragments, this run "
                             f"{len(self.fragments)}; resume with the same algo.fragments")
        with torch.no_grad():
            for phi, saved in zip(self.outer.phi, state["outer_params"], strict=True):
                phi.copy_(saved)
        for opt, saved in zip(self.outer_optimizers, state["outer_optimizers"], strict=True):
            opt.load_state_dict(saved)
        self.compressor.load_state_dict(state.get("compressor"))
        # Re-issue the reductions that were in flight, in the order they were started (the same on
        # every worker, which all resume from the same step).
        self.inflight = {}
        for p, saved in sorted(state.get("inflight", {}).items(), key=lambda kv: (kv[1]["apply_at"], int(kv[0]))):
            p = int(p)
            targets = self.outer.grads(p)
            self.inflight[p] = (int(saved["apply_at"]), resume_mean(self.comm, self.compressor.codec, saved, targets))

    def report(self) -> dict[str, Any]:
        return {**super().report(), "outer_syncs": self.outer_syncs, "skipped_syncs": self.skipped_syncs,
                "fragment_syncs": list(self.fragment_syncs), "fragment_skips": list(self.fragment_skips),
                "fragment_numel": [sum(b - a for _, a, b in pieces) for pieces in self.fragments],
                "compression": self.cfg.compression, "error_feedback": self.cfg.error_feedback,
                "outer_blocked_s": self.outer_blocked_s,
                "compressor_resets": self.compressor.resets, **self.outer.report([*self._momenta(), *self.compressor.tensors()])}

    def _momenta(self) -> list[torch.Tensor]:
        return [st["momentum_buffer"] for opt in self.outer_optimizers for st in opt.state.values()
                if st.get("momentum_buffer") is not None]


attach = StreamingDiLoCo.attach
