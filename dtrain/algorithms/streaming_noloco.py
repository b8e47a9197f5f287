"""Streaming NoLoCo: NoLoCo's gossip step taken fragment by fragment, its exchange in flight during compute.

The fragments and schedule are Streaming DiLoCo's (`dtrain.algorithms.fragments`): fragment p is
due at the steps t ≡ p·H/P (mod H). At t the worker computes Δ_p = θ_p − φ_p and posts Δ_p and φ_p
(one message) to the members of its group, drawn as NoLoCo draws them (`groups_for_round`, the
round being the fragment's own count of syncs); at t + τ it takes what arrived, updates δ_p and φ_p
by NoLoCo's rule (`gossip_update`) and mixes θ_p ← α·θ_p + (1 − α)·φ_p. A member that has not
answered ``timeout_s`` after we reach t + τ is left out of that fragment's means, as in NoLoCo.
With P = 1, τ = 0 and α = 0 this is NoLoCo (its numbers, bit for bit).

Compression is NoLoCo's (Δ by the codec, with optional error feedback, our own term then being our
decoded wire; φ as is, or int8 under int4/topk). A checkpoint taken while exchanges are in flight
saves what this worker posted, and a resume posts it again (the partner does the same).
``outer_device="cpu"`` keeps φ and δ in host memory.

``StreamingNoLoCo(optimizer, comm, cfg=None, *, seed=0, model=None, total_steps=None, **overrides)``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from dtrain.algorithms.base import Algorithm, AttachContext, Attached, check_outer_step
from dtrain.algorithms.compress import DEFAULT_BLOCK, TOPK_DEFAULTS, Codec, DecodeError, check_compression, codec_of
from dtrain.algorithms.fragments import check_schedule, fragments_of, view
from dtrain.algorithms.noloco_math import Flats, check_gossip, effective_gamma, gossip_update, group_of
from dtrain.algorithms.outer_reduce import Compressor
from dtrain.algorithms.outer_state import OUTER_DEVICES, outer_copy, state_report
from dtrain.comm.base import BadPeerData, Comm, CommError, Handle, PeerTimeout
from dtrain.comm.flat import flatten, group_by_dtype, split_like

log = logging.getLogger(__name__)


@dataclass
class Config:
    name: str = "streaming_noloco"
    sync_every: int = 50  # H: each fragment's gossip step comes every H inner steps
    outer_lr: float = 0.7  # β
    outer_momentum: float = 0.5  # α of NoLoCo (δ's decay)
    nesterov: bool = False  # NoLoCo's look-ahead form of the outer step
    gamma: float | None = None  # γ; None = outer_lr
    group_size: int = 2
    fragments: int = 5  # P (H = 50, the NoLoCo paper's, is a multiple of it)
    fragment_paths: list[str] = field(default_factory=list)  # per fragment "prefix,prefix"; [] = even split by size
    overlap_steps: int = 1  # τ
    mix_alpha: float = 0.5  # θ ← mix_alpha·θ_local + (1 − mix_alpha)·φ when a fragment is applied
    compression: str = "none"
    error_feedback: bool = False
    error_feedback_decay: float = 1.0  # β: the share of the unsent residual kept each round (SparseLoCo: 0.95)
    block_size: int = DEFAULT_BLOCK
    topk_density: float = TOPK_DEFAULTS["topk_density"]
    topk_chunk: int = TOPK_DEFAULTS["topk_chunk"]
    topk_value_bits: int = TOPK_DEFAULTS["topk_value_bits"]
    timeout_s: float = 60.0
    broadcast_init: bool = True
    outer_device: str = "same"

    def validate(self) -> None:
        """One-line ValueError naming the key; works on a DictConfig section too (attributes only)."""
        check_outer_step(self)
        check_gossip(self)
        check_schedule(self)
        check_compression(self)
        if self.outer_device not in OUTER_DEVICES:
            raise ValueError(f"algo.outer_device must be one of {list(OUTER_DEVICES)}, got {self.outer_device!r}")


validate = Config.validate  # dtrain.config calls it on the algo section


@dataclass
class _Exchange:
    """One fragment's exchange in flight."""

    apply_at: int
    round_: int
    others: list[int]
    payload: list[torch.Tensor]  # what we posted: Δ wires, then φ wires
    own: Flats  # our Δ term in the means (our decoded wire under error feedback)
    handles: dict[int, Handle]


class StreamingNoLoCo(Algorithm):
    Config = Config

    def __init__(self, optimizer: torch.optim.Optimizer, comm: Comm, cfg: Config | None = None, *, seed: int = 0,
                 model: torch.nn.Module | None = None, total_steps: int | None = None, **overrides: Any) -> None:
        super().__init__(optimizer, comm, cfg, **overrides)
        self.seed, self.total_steps = seed, total_steps
        self.gamma = effective_gamma(self.cfg)
        params = self.params
        self.fragments = fragments_of(params, self.cfg.fragments, self.cfg.fragment_paths, model)
        if self.cfg.broadcast_init:
            with torch.no_grad():
                comm.broadcast(params, src=0)
        self.codec = codec_of(self.cfg)
        self.phi_codec = self.codec if self.codec.name in ("none", "bf16", "int8") else Codec("int8", block=self.cfg.block_size)
        self.compressor = Compressor.of(self.cfg, self.codec)
        # per fragment: the dtype groups of its pieces, then φ and δ as one flat vector per group
        self.groups = [group_by_dtype(self._thetas(p)) for p in range(len(self.fragments))]
        self.phi = [[self._outer(f) for f in self._flats(p)] for p in range(len(self.fragments))]
        self.momentum = [[torch.zeros_like(f) for f in phis] for phis in self.phi]
        self.inflight: dict[int, _Exchange] = {}
        self.fragment_syncs = [0] * len(self.fragments)
        self.solo_rounds = 0
        self.member_failures = 0
        self.outer_blocked_s = 0.0

    @classmethod
    def attach(cls, cfg: Any, ctx: AttachContext) -> Attached:
        return Attached(algorithm=cls(ctx.optimizer, ctx.comm, cfg, seed=ctx.seed, model=ctx.model, total_steps=ctx.total_steps))

    @property
    def outer_syncs(self) -> int:
        return sum(self.fragment_syncs)

    def _outer(self, t: torch.Tensor) -> torch.Tensor:
        return outer_copy(t, "cpu") if self.cfg.outer_device == "cpu" and t.device.type != "cpu" else t

    def _thetas(self, p: int) -> list[torch.Tensor]:
        params = self.params
        return [view(params[piece[0]].detach(), piece) for piece in self.fragments[p]]

    def _flats(self, p: int) -> Flats:
        thetas = self._thetas(p)
        return [flatten([thetas[i] for i in idx]) for idx in self.groups[p]]

    # -- schedule (Streaming DiLoCo's) --------------------------------------------------------
    def due(self, step: int) -> tuple[int, int] | None:
        """(fragment, its round) whose exchange starts after inner step ``step``, if any."""
        h, stride = self.cfg.sync_every, self.cfg.sync_every // len(self.fragments)
        if step <= 0 or step % h % stride:
            return None
        p = step % h // stride
        return p, (step - p * stride) // h + (1 if p else 0)

    def after_step(self) -> None:
        t = self.step
        last = self.total_steps is not None and t >= self.total_steps
        for p in sorted(self.inflight, key=lambda q: (self.inflight[q].apply_at, q)):
            if self.inflight[p].apply_at <= t or last:
                self._apply(p)
        due = self.due(t)
        if due is not None:
            self._start(*due, t)
            if self.cfg.overlap_steps == 0 or last:
                self._apply(due[0])

    def _group(self, round_: int) -> list[int]:
        return group_of(self.comm.rank, self.comm.peers_in_round(round_), round_, seed=self.seed, group_size=self.cfg.group_size)

    def _tag(self, p: int, round_: int) -> int:
        return 2 * (round_ * len(self.fragments) + p) + 1  # P = 1: NoLoCo's Δ tag of the round

    @torch.no_grad()
    def _start(self, p: int, round_: int, t: int) -> None:
        if p in self.inflight:  # cannot happen with overlap_steps < sync_every; kept as a guard
            self._apply(p)
        delta = [f.to(phi.device, non_blocking=True) - phi for f, phi in zip(self._flats(p), self.phi[p])]
        wires = [self.compressor.encode(f"frag{p}/{g}", d) for g, d in enumerate(delta)]
        own = delta
        if self.compressor.error_feedback:
            try:
                own = [self.codec.decode(w, d.numel()).to(d.dtype) for w, d in zip(wires, delta)]
            except DecodeError:
                pass  # our own Δ is not finite: it reaches the means as it is
        payload = [*wires, *(self.phi_codec.encode(f) for f in self.phi[p])]
        others = self._group(round_)
        self.inflight[p] = _Exchange(t + self.cfg.overlap_steps, round_, others, payload, own, self._post(p, round_, others, payload))

    def _post(self, p: int, round_: int, others: list[int], payload: list[torch.Tensor]) -> dict[int, Handle]:
        blocked, handles = self.comm.stats.blocked_s, {}
        for j in others:
            try:
                handles[j] = self.comm.exchange(payload, j, tag=self._tag(p, round_), timeout=self.cfg.timeout_s, async_op=True)
            except CommError:
                continue  # counted as a failed member when the fragment is applied
        self.outer_blocked_s += self.comm.stats.blocked_s - blocked
        return handles

    @torch.no_grad()
    def _apply(self, p: int) -> None:
        ex = self.inflight.pop(p)
        deadline = time.monotonic() + self.cfg.timeout_s
        blocked = self.comm.stats.blocked_s
        received: dict[int, tuple[Flats, Flats]] = {}
        n = len(self.phi[p])
        for j in ex.others:
            try:
                handle = ex.handles.get(j)
                if handle is None:
                    raise CommError("exchange could not be started")
                wires = handle.wait(timeout=max(deadline - time.monotonic(), 1e-3))
                delta_j = [self.codec.decode(w, f.numel()).to(f.dtype) for w, f in zip(wires[:n], self.phi[p])]
                phi_j = [self.phi_codec.decode(w, f.numel()).to(f.dtype) for w, f in zip(wires[n:], self.phi[p])]
                received[j] = (delta_j, phi_j)
            except (PeerTimeout, BadPeerData, DecodeError, CommError) as e:
                self.member_failures += 1
                log.warning("streaming noloco fragment %d round %d: rank %d left out of rank %d's means: %s",
                            p, ex.round_, j, self.comm.rank, e)
        self.outer_blocked_s += self.comm.stats.blocked_s - blocked
        gossip_update(self.phi[p], self.momentum[p], ex.own, received, rank=self.comm.rank,
                      alpha=self.cfg.outer_momentum, beta=self.cfg.outer_lr, gamma=self.gamma, nesterov=self.cfg.nesterov)
        for g in range(n):
            self.compressor.settle(f"frag{p}/{g}")
        self.fragment_syncs[p] += 1
        if not received and ex.others:
            self.solo_rounds += 1
        thetas = self._thetas(p)
        for idx, phi in zip(self.groups[p], self.phi[p]):
            group = [thetas[i] for i in idx]
            target = [x.to(t.device, non_blocking=True) for x, t in zip(split_like(phi, group), group)]
            if self.cfg.mix_alpha == 0:
                torch._foreach_copy_(group, target)
            else:
                torch._foreach_lerp_(group, target, 1.0 - self.cfg.mix_alpha)

    # -- state --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(), "fragment_syncs": list(self.fragment_syncs), "solo_rounds": self.solo_rounds,
            "member_failures": self.member_failures, "phi": [[f.clone() for f in fs] for fs in self.phi],
            "momentum": [[m.clone() for m in ms] for ms in self.momentum], "compressor": self.compressor.state_dict(),
            "inflight": {int(p): {"apply_at": ex.apply_at, "round": ex.round_, "others": list(ex.others),
                                  "payload": [w.clone() for w in ex.payload], "own": [o.clone() for o in ex.own]}
                         for p, ex in self.inflight.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if len(state["fragment_syncs"]) != len(self.fragments):
            raise ValueError(f"streaming_noloco checkpoint has {len(state['fragment_syncs'])} fragments, this run "
                             f"{len(self.fragments)}; resume with the same algo.fragments")
        self.fragment_syncs = [int(x) for x in state["fragment_syncs"]]
        self.solo_rounds, self.member_failures = int(state["solo_rounds"]), int(state["member_failures"])
        for mine, saved in ((self.phi, state["phi"]), (self.momentum, state["momentum"])):
            for ms, ss in zip(mine, saved, strict=True):
                for m, s in zip(ms, ss, strict=True):
                    m.copy_(s)
        self.compressor.load_state_dict(state.get("compressor"))
        self.inflight = {}
        for p, saved in sorted(state.get("inflight", {}).items(), key=lambda kv: (kv[1]["apply_at"], int(kv[0]))):
            p, others, payload = int(p), [int(j) for j in saved["others"]], [w.clone() for w in saved["payload"]]
            self.inflight[p] = _Exchange(int(saved["apply_at"]), int(saved["round"]), others, payload,
                                         [o.clone() for o in saved["own"]], self._post(p, int(saved["round"]), others, payload))

    def report(self) -> dict[str, Any]:
        state = [t for fs in (*self.phi, *self.momentum) for t in fs] + self.compressor.tensors()
        return {**super().report(), "outer_syncs": self.outer_syncs, "fragment_syncs": list(self.fragment_syncs),
                "solo_rounds": self.solo_rounds, "member_failures": self.member_failures,
                "outer_blocked_s": self.outer_blocked_s, "compression": self.cfg.compression,
                "error_feedback": self.cfg.error_feedback,
                "fragment_numel": [sum(b - a for _, a, b in pieces) for pieces in self.fragments],
                **state_report(self.cfg.outer_device, state)}


attach = StreamingNoLoCo.attach
