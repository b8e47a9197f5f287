"""DiLoCo (Douillard et al. 2023): local inner steps, an outer Nesterov step every H steps.

Every ``sync_every`` inner steps: Δ = mean_i(φ − θ_i) by one all-reduce, φ ← OuterSGD(φ, Δ),
θ_i ← φ. The outer optimizer is torch's SGD over a copy φ of the parameters, so with
``outer_lr=1, outer_momentum=0`` DiLoCo is plain parameter averaging every H steps.

A mean Δ that is not finite (a peer sent NaN/Inf, or finite values overflowed) never reaches φ
or θ: every worker holds the same reduced Δ, so all of them skip that outer step together
(``skipped_syncs``) and reset θ to the unchanged φ. With ``robust`` or ``robust_norm_bound`` set,
Δ is all-gathered and aggregated by `dtrain.algorithms.robust` (same rows, same result on every
worker; the norm bound's reference is the median norm of the Δs); a peer whose Δ is malformed or
not finite is left out of that round and named in ``report()["robust"]``.

Mixed-dtype models (fp32 and bf16 parameters): φ, its outer momentum and Δ are kept per
parameter in that parameter's dtype, and the comm reduces each dtype group in its own precision.

``outer_device="cpu"`` keeps φ, Δ and the outer momentum in host memory (`dtrain.algorithms.outer_state`).

``compression`` (`dtrain.algorithms.compress`: bf16, int8, int4, topk) sends Δ encoded, one vector
per dtype group, optionally with ``error_feedback`` (`dtrain.algorithms.outer_reduce`); codecs an
all-reduce cannot sum are all-gathered and summed in fp32 on every worker. A peer's payload that
does not decode makes that mean NaN on every worker, so the outer step is skipped as above.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from dtrain.algorithms.base import Algorithm, all_finite, check_outer_step, locals_
from dtrain.algorithms.compress import DEFAULT_BLOCK, TOPK_DEFAULTS, check_compression
from dtrain.algorithms.outer_reduce import Compressor, start_mean
from dtrain.algorithms.outer_state import OUTER_DEVICES, outer_copy, state_report
from dtrain.algorithms.robust import DEFAULT_TRIM, Options, Tracker, aggregate, check_options, common_dtype
from dtrain.comm.base import Comm


@dataclass
class Config:
    name: str = "diloco"
    sync_every: int = 500
    outer_lr: float = 0.7
    outer_momentum: float = 0.9
    nesterov: bool = True
    broadcast_init: bool = True
    robust: str = "none"  # none | trimmed_mean | median (coordinate-wise, over every worker's Δ)
    robust_trim: float = DEFAULT_TRIM  # trimmed_mean: fraction dropped at each end
    robust_norm_bound: float = 0.0  # 0 = off; else clip a Δ to this multiple of the median Δ norm
    compression: str = "none"  # none | bf16 | int8 | int4 | topk (dtrain.algorithms.compress)
    error_feedback: bool = False  # carry what compression dropped into the next outer step
    error_feedback_decay: float = 1.0  # β: the share of the unsent residual kept each round (SparseLoCo: 0.95)
    block_size: int = DEFAULT_BLOCK  # int8/int4: elements per fp32 scale
    topk_density: float = TOPK_DEFAULTS["topk_density"]  # topk: fraction of each chunk sent
    topk_chunk: int = TOPK_DEFAULTS["topk_chunk"]  # topk: elements per chunk
    topk_value_bits: int = TOPK_DEFAULTS["topk_value_bits"]  # topk: 2 or 4 bits per kept value
    outer_device: str = "same"  # same (the parameters' device) | cpu (φ, momentum and Δ in host memory)

    def validate(self) -> None:
        """One-line ValueError naming the key; works on a DictConfig section too (attributes only)."""
        check_outer_step(self)
        if self.nesterov and self.outer_momentum == 0:
            raise ValueError("algo.nesterov=true needs algo.outer_momentum > 0 (set algo.nesterov=false)")
        check_options(self.robust, self.robust_trim, self.robust_norm_bound)
        check_compression(self)
        if self.outer_device not in OUTER_DEVICES:
            raise ValueError(f"algo.outer_device must be one of {list(OUTER_DEVICES)}, got {self.outer_device!r}")
        if self.compression != "none" and (self.robust != "none" or self.robust_norm_bound > 0):
            raise ValueError(f"algo.compression={self.compression} cannot be combined with robust aggregation, which "
                             "gathers every worker's full Δ; drop one of them")


validate = Config.validate  # dtrain.config calls it on the algo section


class DiLoCo(Algorithm):
    """``DiLoCo(optimizer, comm, cfg=None, **overrides)``: the options of `Config` (e.g.
    ``DiLoCo(opt, comm, sync_every=500, outer_lr=0.7, outer_momentum=0.9)``)."""

    Config = Config

    def __init__(self, optimizer: torch.optim.Optimizer, comm: Comm, cfg: Config | None = None, **overrides: Any) -> None:
        super().__init__(optimizer, comm, cfg, **overrides)
        self.outer_syncs = 0
        self.skipped_syncs = 0  # outer steps skipped on every worker: the mean Δ was not finite
        self.outer_blocked_s = 0.0  # seconds blocked in the outer steps' own communication
        self.robust = Options(self.cfg.robust, self.cfg.robust_trim, self.cfg.robust_norm_bound)
        self.tracker = Tracker("diloco", self.robust)
        self.compressor = Compressor.of(self.cfg)
        params = self.params
        if self.cfg.broadcast_init:
            with torch.no_grad():
                comm.broadcast(params, src=0)
        # φ: the slow weights, a copy of the fast weights at the last sync; outer grads live in φ.grad.
        self.outer_params = [outer_copy(p, self.cfg.outer_device) for p in params]
        for phi in self.outer_params:
            phi.grad = torch.zeros_like(phi)
        self.outer_optimizer = torch.optim.SGD(
            self.outer_params, lr=self.cfg.outer_lr, momentum=self.cfg.outer_momentum, nesterov=self.cfg.nesterov
        )
        # `release`/`restore` (LISA): which φ are held, which to drop after the next sync, and
        # whether θ = φ still holds (no inner step since the last sync), so a drop can be immediate.
        self.held = [True] * len(self.outer_params)
        self._release_at_sync: set[int] = set()
        self._synced = True

    @property
    def sync_every(self) -> int:
        return self.cfg.sync_every

    def before_step(self) -> None:
        self._synced = False

    def after_step(self) -> None:
        if self.step % self.sync_every == 0:
            self.sync()

    def _indices(self, params: list[torch.Tensor]) -> list[int]:
        where = {id(p): i for i, p in enumerate(self.params)}
        return [where[id(p)] for p in params]

    def release(self, params: list[torch.Tensor]) -> None:
        """Frozen ``params`` lose φ and outer momentum: now if θ = φ, else after the next sync
        (which still averages what they trained since the last one, keeping replicas identical)."""
        for i in self._indices(params):
            if self.held[i] and self._synced:
                self._drop(i)
            elif self.held[i]:
                self._release_at_sync.add(i)

    @torch.no_grad()
    def restore(self, params: list[torch.Tensor]) -> None:
        """``params`` train again: φ ← their θ (equal on every worker: frozen since a sync), momentum from zero."""
        for i, p in zip(self._indices(params), params):
            self._release_at_sync.discard(i)
            if not self.held[i]:
                phi = self.outer_params[i]
                phi.data = outer_copy(p, self.cfg.outer_device)
                phi.grad = torch.zeros_like(phi)
                self.held[i] = True

    def _drop(self, i: int) -> None:
        phi = self.outer_params[i]
        self.outer_optimizer.state.pop(phi, None)
        phi.grad = None  # torch's SGD skips it
        phi.data = torch.empty(0, dtype=phi.dtype, device=phi.device)
        self.held[i] = False

    @torch.no_grad()
    def sync(self) -> None:
        """The outer step: average the pseudo-gradients, step φ, reset θ to φ (held φ only)."""
        held = [i for i, h in enumerate(self.held) if h]
        params = [self.params[i] for i in held] if len(held) < len(self.held) else self.params
        outer = [self.outer_params[i] for i in held]
        # Local shards (DTensor parameters of a sharded worker: dtrain.hierarchy); plain tensors as they are.
        local_outer, local_params = locals_(outer), locals_([p.detach() for p in params])
        deltas = locals_([phi.grad for phi in outer])
        torch._foreach_copy_(deltas, local_outer)
        torch._foreach_sub_(deltas, [t.to(phi.device, non_blocking=True) for t, phi in zip(local_params, local_outer)])
        keys: list[str] = []
        if self.robust.active:
            self._robust_mean(deltas)
        else:
            blocked = self.comm.stats.blocked_s
            pending = start_mean(self.comm, self.compressor, deltas, "delta")
            pending.wait_into()
            self.outer_blocked_s += self.comm.stats.blocked_s - blocked
            keys = pending.keys
        # Check the reduced Δ, never only our own: a peer's NaN arrives in the mean.
        if not all_finite(self.comm, deltas):  # a sharded worker's processes agree (one inner reduction)
            # Every worker sees the same reduced Δ, so every worker skips together.
            self.skipped_syncs += 1
            for key in keys:
                self.compressor.rollback(key)
        else:
            self.outer_optimizer.step()
            self.outer_syncs += 1
            for key in keys:
                self.compressor.settle(key)
        torch._foreach_copy_(local_params, local_outer)
        for i in sorted(self._release_at_sync):
            self._drop(i)
        self._release_at_sync.clear()
        self._synced = True

    def _robust_mean(self, deltas: list[torch.Tensor]) -> None:
        """Overwrite ``deltas`` with the robust aggregate of every worker's (NaN if none usable)."""
        dtype = common_dtype(deltas)  # the estimators work on one row per worker: one dtype
        flat = torch.cat([d.reshape(-1).to(dtype) for d in deltas])
        gathered = self.comm.all_gather([flat], skip_bad=True)
        ranks = [r for r, got in enumerate(gathered) if got]
        where = f"outer step {self.step // self.sync_every}"
        self.tracker.note("dropped", [r for r in self.comm.peers() if r >= len(gathered) or not gathered[r]],
                          rank=self.comm.rank, where=where)
        if not ranks:
            value = torch.full_like(flat, float("nan"))
        else:
            result = aggregate(torch.stack([gathered[r][0] for r in ranks]), self.robust)
            self.tracker.round(result, ranks, rank=self.comm.rank, where=where)
            value = result.value
        offset = 0
        for d in deltas:
            d.copy_(value[offset : offset + d.numel()].view_as(d))
            offset += d.numel()

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "outer_syncs": self.outer_syncs,
            "skipped_syncs": self.skipped_syncs,
            "outer_params": [phi.detach().clone() for phi in self.outer_params],  # a released φ: empty
            "outer_optimizer": self.outer_optimizer.state_dict(),
            "held": list(self.held), "release_at_sync": sorted(self._release_at_sync), "synced": self._synced,
            "robust": self.tracker.state_dict(), "compressor": self.compressor.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.outer_syncs = int(state["outer_syncs"])
        self.skipped_syncs = int(state["skipped_syncs"])
        held = state.get("held", [True] * len(self.outer_params))
        with torch.no_grad():
            for i, (phi, saved) in enumerate(zip(self.outer_params, state["outer_params"], strict=True)):
                if not held[i]:
                    if self.held[i]:
                        self._drop(i)
                elif phi.shape != saved.shape:  # released here, held in the checkpoint
                    phi.data = saved.to(phi.device, copy=True)  # a checkpoint is loaded on the CPU
                    phi.grad = torch.zeros_like(phi)
                    self.held[i] = True
                else:
                    phi.copy_(saved)
        self._release_at_sync = {int(i) for i in state.get("release_at_sync", [])}
        self._synced = bool(state.get("synced", self.step % self.sync_every == 0))
        self.outer_optimizer.load_state_dict(state["outer_optimizer"])
        self.tracker.load_state_dict(state.get("robust"))
        self.compressor.load_state_dict(state.get("compressor"))

    def _resident(self) -> dict[str, Any]:
        momenta = [st["momentum_buffer"] for st in self.outer_optimizer.state.values() if st.get("momentum_buffer") is not None]
        grads = [phi.grad for phi in self.outer_params if phi.grad is not None]
        return state_report(self.cfg.outer_device, [*self.outer_params, *grads, *momenta, *self.compressor.tensors()])

    def report(self) -> dict[str, Any]:
        out: dict[str, Any] = {**super().report(), "outer_syncs": self.outer_syncs, "skipped_syncs": self.skipped_syncs,
                               "compression": self.cfg.compression, "error_feedback": self.cfg.error_feedback,
                               "outer_blocked_s": self.outer_blocked_s,
                               **self._resident()}
        if self.robust.active:
            out["robust"] = self.tracker.report()
        return out



attach = DiLoCo.attach  # what `dtrain train` calls: DiLoCo(ctx.optimizer, ctx.comm, cfg.algo)
