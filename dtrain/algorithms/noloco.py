"""NoLoCo (Kolehmainen et al. 2025, arXiv 2506.10911): gossip Nesterov averaging, no collectives.

Every ``sync_every`` (H) inner steps, worker i meets the other members of its group (size n,
2 by default), drawn from a permutation that every worker computes from the run seed and the
outer step number, so no coordinator and no collective is needed. With Δ_i = θ_i − φ_i and
means over the members that answered:

    δ_i ← α·δ_i + β·mean(Δ) − γ·(φ_i − mean(φ))
    φ_i ← φ_i + δ_i ;  θ_i ← φ_i

α = outer_momentum, β = outer_lr, γ = gamma (defaults to β, as in the paper's code). With n = N
every φ_i is equal, the γ term vanishes and this is DiLoCo with outer SGD (lr β, momentum α,
no Nesterov).

Choices beyond the paper's code, each documented where it lives:
- any worker count: a worker left alone by the chunking joins the previous group (a group of
  three for n = 2) rather than sitting the round out, so every worker contributes every round;
- groups of n > 2 exchange pairwise inside the group (each member with every other member);
- φ does not change between outer steps, so its exchange is started ``phi_lead_steps`` inner
  steps early (-1: right after the previous outer step) and overlaps compute; 0 sends φ with Δ;
- optional bf16 / int8 (per-block scale) wire format, with the error it adds measured each round;
- a member that does not answer within ``timeout_s`` of this worker reaching the outer step, or
  sends bad data, is left out of this worker's means for the round (alone: a solo outer step).
  The late member still finds our message waiting and completes its round with it; a worker
  that stays slow thus keeps receiving the others' Δ and φ while its own stop reaching them, so
  ``timeout_s`` should sit above normal jitter and below the lag you refuse to wait for.

In your own loop (`dtrain train` does the same; its end-of-run gather plays the barrier):

    algo = NoLoCo(optimizer, comm, seed=0, sync_every=50, total_steps=steps)
    for step in range(steps): loss_fn(batch).backward(); optimizer.step(); optimizer.zero_grad()
    comm.barrier()  # before closing: lets a late partner finish its last exchange with us

Stability (paper appendix, n = 2): α < γ < sqrt(2 + α²). We raise a ValueError for group_size 2
outside it (a configuration error the user must fix), and do not check other group sizes, where
the paper gives no condition (n = N does not depend on γ at all).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from dtrain.algorithms.base import AttachContext, Attached, OptimizerHook
from dtrain.algorithms.noloco_compress import MODES, DecodeError, decode, encode, wire_numel
from dtrain.comm.base import BadPeerData, Comm, CommError, Handle, PeerTimeout
from dtrain.workloads.base import generator

log = logging.getLogger(__name__)

_PHI, _DELTA = 0, 1  # tag = 2 * round + kind keeps φ and Δ of a round (and rounds) apart


@dataclass
class Config:
    name: str = "noloco"
    sync_every: int = 50  # H inner steps per outer step
    outer_lr: float = 0.7  # β
    outer_momentum: float = 0.5  # α
    gamma: float | None = None  # γ, pull towards the group's mean φ; None = outer_lr
    group_size: int = 2  # n; a worker left alone joins the previous group
    phi_lead_steps: int = -1  # start φ's exchange this many steps before the outer step; -1 = whole round, 0 = with Δ
    compression: str = "none"  # none | bf16 | int8 (per-block fp32 scale)
    block_size: int = 64  # int8 elements per scale
    timeout_s: float = 60.0  # a member silent this long after we reach the outer step is skipped this round
    broadcast_init: bool = True  # start every worker from rank 0's weights (one setup collective)


def effective_gamma(cfg: Config) -> float:
    return float(cfg.outer_lr if cfg.gamma is None else cfg.gamma)


def validate(cfg: Config) -> None:
    if cfg.sync_every < 1:
        raise ValueError(f"algo.sync_every must be >= 1, got {cfg.sync_every}")
    if cfg.outer_lr <= 0:
        raise ValueError(f"algo.outer_lr must be > 0, got {cfg.outer_lr}")
    if not 0 <= cfg.outer_momentum < 1:
        raise ValueError(f"algo.outer_momentum must be in [0, 1), got {cfg.outer_momentum}")
    if cfg.gamma is not None and cfg.gamma < 0:
        raise ValueError(f"algo.gamma must be >= 0 (or null for outer_lr), got {cfg.gamma}")
    if cfg.group_size < 2:
        raise ValueError(f"algo.group_size must be >= 2, got {cfg.group_size}")
    if cfg.phi_lead_steps < -1:
        raise ValueError(f"algo.phi_lead_steps must be >= -1 (-1 = whole round, 0 = send with Δ), got {cfg.phi_lead_steps}")
    if cfg.compression not in MODES:
        raise ValueError(f"algo.compression must be one of {list(MODES)}, got {cfg.compression!r}")
    if cfg.block_size < 1:
        raise ValueError(f"algo.block_size must be >= 1, got {cfg.block_size}")
    if cfg.timeout_s <= 0:
        raise ValueError(f"algo.timeout_s must be > 0, got {cfg.timeout_s}")
    alpha, gamma = cfg.outer_momentum, effective_gamma(cfg)
    upper = math.sqrt(2 + alpha**2)
    if cfg.group_size == 2 and not alpha < gamma < upper:
        raise ValueError(
            f"algo.gamma={gamma:g} is outside the stability range ({alpha:g}, {upper:.4g}) that group_size 2 "
            "needs (outer_momentum < gamma < sqrt(2 + outer_momentum^2)); set algo.gamma inside it"
        )


def groups_for_round(members: Sequence[int], round_: int, *, seed: int, group_size: int) -> list[list[int]]:
    """The round's groups: chunks of a shared-seed permutation; a lone leftover joins the last group.

    A pure function of (members, round, seed, group size), so every worker computes the same
    matching without talking. Groups are sorted by rank; every member is in exactly one group.
    """
    ordered = sorted(members)
    if not ordered:
        return []
    perm = torch.randperm(len(ordered), generator=generator("noloco-groups", seed, round_)).tolist()
    shuffled = [ordered[i] for i in perm]
    n = min(group_size, len(shuffled))
    groups = [shuffled[i : i + n] for i in range(0, len(shuffled), n)]
    if len(groups) > 1 and len(groups[-1]) == 1:
        groups[-2].extend(groups.pop())
    return [sorted(g) for g in groups]


def _flat(params: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).float() for p in params])


class NoLoCo(OptimizerHook):
    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        comm: Comm,
        *,
        seed: int = 0,
        sync_every: int = 50,
        outer_lr: float = 0.7,
        outer_momentum: float = 0.5,
        gamma: float | None = None,
        group_size: int = 2,
        phi_lead_steps: int = -1,
        compression: str = "none",
        block_size: int = 64,
        timeout_s: float = 60.0,
        broadcast_init: bool = True,
        total_steps: int | None = None,
    ) -> None:
        cfg = Config(sync_every=sync_every, outer_lr=outer_lr, outer_momentum=outer_momentum, gamma=gamma,
                     group_size=group_size, phi_lead_steps=phi_lead_steps, compression=compression,
                     block_size=block_size, timeout_s=timeout_s)
        validate(cfg)
        super().__init__(optimizer, comm)
        self.seed, self.sync_every, self.group_size = seed, sync_every, group_size
        self.total_steps = total_steps  # known: no φ is sent ahead for a round the run never reaches
        self.beta, self.alpha, self.gamma = outer_lr, outer_momentum, effective_gamma(cfg)
        self.phi_lead_steps, self.compression, self.block_size, self.timeout_s = phi_lead_steps, compression, block_size, timeout_s
        if broadcast_init:
            with torch.no_grad():
                comm.broadcast(self.params, src=0)
        self.phi = _flat(self.params)  # φ_i, fp32 master copy of the slow weights
        self.momentum = torch.zeros_like(self.phi)  # δ_i
        self.outer_syncs = 0  # rounds done
        self.solo_rounds = 0  # rounds where no other member answered
        self.member_failures = 0  # (round, member) pairs skipped: timeout, bad data, transport error
        self.phi_wait_s = 0.0
        self.delta_wait_s = 0.0
        self.wire_error = {"delta": 0.0, "phi": 0.0}  # summed relative error ||q(x) - x|| / ||x||
        self._phi_round = -1
        self._phi_handles: dict[int, Handle] = {}
        self.group_log: list[tuple[int, list[int]]] = []  # (round, group incl. self), last 64 rounds, for checks
        self.abandoned_exchanges = 0  # waits given up on (the backend keeps their buffers for the late peer)

    # -- schedule --------------------------------------------------------------------------
    def before_step(self) -> None:
        self._maybe_send_phi()

    def after_step(self) -> None:
        if self.step % self.sync_every == 0:
            self.sync(self.step // self.sync_every)
        self._maybe_send_phi()

    def _lead(self) -> int:
        return self.sync_every if self.phi_lead_steps == -1 else min(self.phi_lead_steps, self.sync_every)

    def _maybe_send_phi(self) -> None:
        """Start φ's exchange for the coming round once inside its lead window (φ is final by then)."""
        lead = self._lead()
        round_ = self.step // self.sync_every + 1
        if lead == 0 or self._phi_round == round_ or self.step < round_ * self.sync_every - lead:
            return
        if self.total_steps is not None and round_ * self.sync_every > self.total_steps:
            return
        self._start_phi(round_)

    def _start_phi(self, round_: int) -> None:
        self._phi_round = round_
        self._phi_handles = self._post(self._group(round_), self._wire(self.phi, "phi"), 2 * round_ + _PHI)

    # -- one outer step --------------------------------------------------------------------
    def _group(self, round_: int) -> list[int]:
        rank = self.comm.rank
        for g in groups_for_round(self.comm.peers(), round_, seed=self.seed, group_size=self.group_size):
            if rank in g:
                return [j for j in g if j != rank]
        return []

    def _wire(self, flat: torch.Tensor, kind: str) -> torch.Tensor:
        wire = encode(flat, self.compression, block=self.block_size)
        if self.compression != "none":
            back = decode(wire, flat.numel(), self.compression, block=self.block_size)
            norm = float(flat.norm())
            self.wire_error[kind] += float((back - flat).norm()) / norm if norm > 0 else 0.0
        return wire

    def _post(self, others: list[int], wire: torch.Tensor, tag: int) -> dict[int, Handle]:
        handles = {}
        for j in others:
            try:
                handles[j] = self.comm.exchange([wire], j, tag=tag, timeout=self.timeout_s, async_op=True)
            except CommError:
                continue  # counted as a failed member when the round finds no handle for it
        return handles

    def _receive(self, handle: Handle | None, deadline: float, sizes: list[int]) -> list[torch.Tensor]:
        """Wait (until ``deadline``) for one member's message and decode its parts of ``sizes`` elements."""
        if handle is None:
            raise CommError("exchange could not be started")
        try:
            (wire,) = handle.wait(timeout=max(deadline - time.monotonic(), 1e-3))
        except PeerTimeout:
            self.abandoned_exchanges += 1
            raise
        parts, offset = [], 0
        for n in sizes:
            size = wire_numel(n, self.compression, self.block_size)
            parts.append(decode(wire[offset : offset + size], n, self.compression, block=self.block_size))
            offset += size
        return parts

    @torch.no_grad()
    def sync(self, round_: int) -> None:
        """Outer step ``round_``: meet the group, update δ and φ from the members that answered, θ ← φ."""
        params = self.params
        delta = _flat(params) - self.phi
        others = self._group(round_)
        self.group_log = [*self.group_log[-63:], (round_, sorted([self.comm.rank, *others]))]
        numel = self.phi.numel()
        separate_phi = self._lead() > 0
        if separate_phi and self._phi_round != round_:  # e.g. a loop that runs past total_steps
            self._start_phi(round_)
        payload = self._wire(delta, "delta")
        if not separate_phi:
            payload = torch.cat([payload, self._wire(self.phi, "phi")])
        delta_handles = self._post(others, payload, 2 * round_ + _DELTA)
        phi_handles = self._phi_handles if separate_phi else {}
        deadline = time.monotonic() + self.timeout_s
        received: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for j in others:
            try:
                if separate_phi:
                    t0 = time.perf_counter()
                    try:
                        (phi_j,) = self._receive(phi_handles.get(j), deadline, [numel])
                    finally:
                        self.phi_wait_s += time.perf_counter() - t0
                t0 = time.perf_counter()
                try:
                    got = self._receive(delta_handles.get(j), deadline, [numel] if separate_phi else [numel, numel])
                finally:
                    self.delta_wait_s += time.perf_counter() - t0
                delta_j = got[0]
                if not separate_phi:
                    phi_j = got[1]
                received[j] = (delta_j, phi_j)
            except (PeerTimeout, BadPeerData, DecodeError, CommError) as e:
                self.member_failures += 1
                log.warning("noloco outer step %d: rank %d left out of rank %d's means: %s", round_, j, self.comm.rank, e)
        self._phi_handles = {}
        self._update(delta, received)
        self.outer_syncs += 1
        if not received and others:
            self.solo_rounds += 1
        torch._foreach_copy_([p.detach() for p in params], self._unflat(self.phi, params))

    def _update(self, delta: torch.Tensor, received: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> None:
        # Sums in rank order, so every member that saw the same messages computes identical means.
        members = sorted([self.comm.rank, *received])
        sum_delta, sum_phi = torch.zeros_like(delta), torch.zeros_like(self.phi)
        for j in members:
            d, p = (delta, self.phi) if j == self.comm.rank else received[j]
            sum_delta.add_(d)
            sum_phi.add_(p)
        count = len(members)
        self.momentum.mul_(self.alpha).add_(sum_delta.div_(count), alpha=self.beta)
        self.momentum.sub_(self.phi - sum_phi.div_(count), alpha=self.gamma)
        self.phi.add_(self.momentum)

    @staticmethod
    def _unflat(flat: torch.Tensor, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        out, offset = [], 0
        for p in params:
            out.append(flat[offset : offset + p.numel()].view(p.shape).to(p.dtype))
            offset += p.numel()
        return out

    # -- state -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "outer_syncs": self.outer_syncs, "solo_rounds": self.solo_rounds, "member_failures": self.member_failures,
            "phi": self.phi.clone(), "momentum": self.momentum.clone(), "wire_error": dict(self.wire_error),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.outer_syncs = int(state["outer_syncs"])
        self.solo_rounds = int(state["solo_rounds"])
        self.member_failures = int(state["member_failures"])
        self.phi.copy_(state["phi"])
        self.momentum.copy_(state["momentum"])
        self.wire_error = {k: float(v) for k, v in state["wire_error"].items()}
        self._phi_round, self._phi_handles = -1, {}

    def report(self) -> dict[str, Any]:
        rounds = max(self.outer_syncs, 1)
        return {
            "outer_syncs": self.outer_syncs, "solo_rounds": self.solo_rounds, "member_failures": self.member_failures,
            "phi_wait_s": self.phi_wait_s, "delta_wait_s": self.delta_wait_s, "abandoned_exchanges": self.abandoned_exchanges,
            "compression": self.compression, "groups": [[r, g] for r, g in self.group_log],
            "wire_rel_error_delta": self.wire_error["delta"] / rounds, "wire_rel_error_phi": self.wire_error["phi"] / rounds,
        }


def attach(cfg: Config, ctx: AttachContext) -> Attached:
    validate(cfg)
    algo = NoLoCo(
        ctx.optimizer, ctx.comm, seed=ctx.seed, sync_every=cfg.sync_every, outer_lr=cfg.outer_lr,
        outer_momentum=cfg.outer_momentum, gamma=cfg.gamma, group_size=cfg.group_size,
        phi_lead_steps=cfg.phi_lead_steps, compression=cfg.compression, block_size=cfg.block_size,
        timeout_s=cfg.timeout_s, broadcast_init=cfg.broadcast_init, total_steps=ctx.total_steps,
    )
    return Attached(algorithm=algo)
