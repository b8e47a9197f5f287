"""NoLoCo (Kolehmainen et al. 2025, arXiv 2506.10911): gossip Nesterov averaging, no collectives.

Every ``sync_every`` (H) inner steps, worker i meets the other members of its group (size n,
2 by default), drawn from a permutation that every worker computes from the run seed and the
outer step number, so no coordinator and no collective is needed. With Δ_i = θ_i − φ_i and
means over the members that answered:

    δ_i ← α·δ_i + β·mean(Δ) − γ·(φ_i − mean(φ))
    φ_i ← φ_i + δ_i ;  θ_i ← φ_i

α = outer_momentum, β = outer_lr, γ = gamma (defaults to β, as in the paper's code). With n = N
every φ_i is equal, the γ term vanishes and this is DiLoCo with outer SGD (lr β, momentum α,
no Nesterov). ``nesterov=true`` takes the look-ahead form instead (`noloco_math.outer_move`), so
with n = N it is DiLoCo's own outer step (Nesterov SGD, lr β, momentum α).

Choices beyond the paper's code, each documented where it lives:
- any worker count: a worker left alone by the chunking joins the previous group (a group of
  three for n = 2) rather than sitting the round out, so every worker contributes every round;
- groups of n > 2 exchange pairwise inside the group (each member with every other member);
- φ does not change between outer steps, so its exchange is started ``phi_lead_steps`` inner
  steps early (-1: right after the previous outer step) and overlaps compute; 0 sends φ with Δ;
- optional compressed wire (`dtrain.algorithms.compress`: bf16, int8, int4, topk), with the error it
  adds measured each round; int4 and topk apply to Δ only (φ is weights, not a change, and goes
  int8 then); with ``error_feedback`` Δ carries its residual and our own term in the means is our
  decoded wire, so both partners average the same values;
- ``outer_device="cpu"``: φ and δ in host memory (`dtrain.algorithms.outer_state`);
- φ and δ are kept per dtype group of the parameters, in that dtype (float64 stays exact; a
  bf16 parameter keeps bf16 φ, as under DiLoCo), and sent in it without compression; the comm
  carries every dtype group of one message together;
- optional robust aggregation (``robust``: trimmed mean or median over the group, which needs a
  group of at least 3; ``robust_norm_bound`` c: a member's Δ_j, and its φ_j − φ_i, whose norm
  exceeds c·‖Δ_i‖ are scaled down to it, which is what bounds a bad partner in a pair): see
  `dtrain.algorithms.robust`; a member so clipped or set aside is named in ``report()["robust"]``;
- a member that does not answer within ``timeout_s`` of this worker reaching the outer step, or
  sends bad data, is left out of this worker's means for the round (alone: a solo outer step).
  The late member still finds our message waiting and completes its round with it; a worker
  that stays slow thus keeps receiving the others' Δ and φ while its own stop reaching them, so
  ``timeout_s`` should sit above normal jitter and below the lag you refuse to wait for.

``NoLoCo(optimizer, comm, cfg=None, *, seed=0, total_steps=None, **overrides)``: the options of
`Config`, plus two facts of the run rather than options of the algorithm: ``seed``, the run seed
the pairing is drawn from (every worker must pass the same), and ``total_steps``, so no φ is sent
ahead for a round the run never reaches. `attach` passes both from the loop's context.

In your own loop (`dtrain train` does the same; its end-of-run gather plays the barrier):

    algo = NoLoCo(optimizer, comm, sync_every=50, seed=run_seed, total_steps=steps)
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

from dtrain.algorithms.base import Algorithm, AttachContext, Attached, check_outer_step, locals_
from dtrain.algorithms.noloco_layout import HeldLayout
from dtrain.algorithms.noloco_math import Flats, check_gossip, effective_gamma, gossip_update, group_of, outer_move
from dtrain.algorithms.noloco_math import groups_for_round  # noqa: F401 - re-exported for callers of noloco
from dtrain.algorithms.compress import DEFAULT_BLOCK, TOPK_DEFAULTS, Codec, DecodeError, check_compression, codec_of
from dtrain.algorithms.outer_reduce import Compressor
from dtrain.algorithms.outer_state import OUTER_DEVICES, outer_copy, state_report
from dtrain.algorithms.robust import DEFAULT_TRIM, Options, Tracker, aggregate, check_options, common_dtype, degenerate
from dtrain.comm.base import BadPeerData, Comm, CommError, Handle, PeerTimeout
from dtrain.comm.flat import flatten, group_by_dtype, like, split_like

log = logging.getLogger(__name__)

_PHI, _DELTA = 0, 1  # tag = 2 * round + kind keeps φ and Δ of a round (and rounds) apart


@dataclass
class Config:
    name: str = "noloco"
    sync_every: int = 50  # H inner steps per outer step
    outer_lr: float = 0.7  # β
    outer_momentum: float = 0.5  # α
    nesterov: bool = False  # the look-ahead form of the outer step (DiLoCo's optimizer, over the group's means)
    gamma: float | None = None  # γ, pull towards the group's mean φ; None = outer_lr
    group_size: int = 2  # n; a worker left alone joins the previous group
    phi_lead_steps: int = -1  # start φ's exchange this many steps before the outer step; -1 = whole round, 0 = with Δ
    compression: str = "none"  # none | bf16 | int8 | int4 | topk (Δ; φ goes int8 under int4/topk)
    error_feedback: bool = False  # carry what compression dropped from Δ into the next round
    error_feedback_decay: float = 1.0  # β: the share of the unsent residual kept each round (SparseLoCo: 0.95)
    block_size: int = DEFAULT_BLOCK  # int8/int4 elements per scale
    topk_density: float = TOPK_DEFAULTS["topk_density"]  # topk: fraction of each chunk sent
    topk_chunk: int = TOPK_DEFAULTS["topk_chunk"]  # topk: elements per chunk
    topk_value_bits: int = TOPK_DEFAULTS["topk_value_bits"]  # topk: 2 or 4 bits per kept value
    outer_device: str = "same"  # same (the parameters' device) | cpu (φ and δ in host memory)
    timeout_s: float = 60.0  # a member silent this long after we reach the outer step is skipped this round
    broadcast_init: bool = True  # start every worker from rank 0's weights (one setup collective)
    robust: str = "none"  # none | trimmed_mean | median over the group (needs group_size >= 3)
    robust_trim: float = DEFAULT_TRIM  # trimmed_mean: fraction dropped at each end
    robust_norm_bound: float = 0.0  # 0 = off; else clip a member's Δ (and φ - own φ) to this multiple of own ‖Δ‖

    def validate(self) -> None:
        """One-line ValueError naming the key; works on a DictConfig section too (attributes only)."""
        check_outer_step(self)
        check_gossip(self)
        if self.phi_lead_steps < -1:
            raise ValueError(f"algo.phi_lead_steps must be >= -1 (-1 = whole round, 0 = send with Δ), got {self.phi_lead_steps}")
        check_compression(self)
        if self.outer_device not in OUTER_DEVICES:
            raise ValueError(f"algo.outer_device must be one of {list(OUTER_DEVICES)}, got {self.outer_device!r}")
        check_options(self.robust, self.robust_trim, self.robust_norm_bound)
        if self.robust != "none" and self.group_size == 2:
            raise ValueError(f"algo.robust={self.robust} needs at least 3 members, and algo.group_size=2 makes pairs; "
                             "use algo.robust_norm_bound (e.g. 2) with algo.robust=none, or raise algo.group_size")
        why = degenerate(Options(self.robust, self.robust_trim, self.robust_norm_bound), self.group_size)
        if why is not None:
            raise ValueError(f"{why} (algo.group_size={self.group_size})")


validate = Config.validate  # dtrain.config calls it on the algo section


class NoLoCo(HeldLayout, Algorithm):
    Config = Config

    def __init__(self, optimizer: torch.optim.Optimizer, comm: Comm, cfg: Config | None = None, *, seed: int = 0,
                 total_steps: int | None = None, **overrides: Any) -> None:
        super().__init__(optimizer, comm, cfg, **overrides)
        self.seed = seed
        self.total_steps = total_steps  # known: no φ is sent ahead for a round the run never reaches
        self.gamma = effective_gamma(self.cfg)
        if self.cfg.broadcast_init:
            with torch.no_grad():
                comm.broadcast(self.params, src=0)
        self.robust = Options(self.cfg.robust, self.cfg.robust_trim, self.cfg.robust_norm_bound)
        self.tracker = Tracker("noloco", self.robust)
        self.codec = codec_of(self.cfg)
        # φ is weights, not a change: a sparse or 4-bit φ would wreck the partner's mean, so it goes int8
        self.phi_codec = self.codec if self.codec.name in ("none", "bf16", "int8") else Codec("int8", block=self.cfg.block_size)
        self.compressor = Compressor.of(self.cfg, self.codec)
        self.dtype_groups = group_by_dtype(self.params)  # fixed: the optimizer's parameters
        self.phi = [self._to_outer(f) for f in self._flats(self.params)]  # φ_i, per dtype group: the slow weights
        self.momentum = [torch.zeros_like(f) for f in self.phi]  # δ_i
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
        self.held = [True] * len(self.params)  # the parameters φ and δ cover (see `HeldLayout`)
        self._changes: dict[int, bool] = {}  # param index -> held after the next outer step
        self._settled = True  # no inner step and no φ sent since the last outer step: change now

    @classmethod
    def attach(cls, cfg: Any, ctx: AttachContext) -> Attached:
        """The run seed (shared pairing) and run length come from the loop, not from ``algo.*``."""
        return Attached(algorithm=cls(ctx.optimizer, ctx.comm, cfg, seed=ctx.seed, total_steps=ctx.total_steps))

    def _to_outer(self, t: torch.Tensor) -> torch.Tensor:
        return outer_copy(t, "cpu") if self.cfg.outer_device == "cpu" and t.device.type != "cpu" else t

    def _flats(self, params: Sequence[torch.Tensor]) -> Flats:
        return [flatten([params[i] for i in idx]) for idx in self.dtype_groups]

    # -- schedule --------------------------------------------------------------------------
    def before_step(self) -> None:
        self._settled = False
        self._maybe_send_phi()

    def after_step(self) -> None:
        if self.step % self.cfg.sync_every == 0:
            self.sync(self.step // self.cfg.sync_every)
        self._maybe_send_phi()

    def _lead(self) -> int:
        h, lead = self.cfg.sync_every, self.cfg.phi_lead_steps
        return h if lead == -1 else min(lead, h)

    def _maybe_send_phi(self) -> None:
        """Start φ's exchange for the coming round once inside its lead window (φ is final by then)."""
        lead, h = self._lead(), self.cfg.sync_every
        round_ = self.step // h + 1
        if lead == 0 or self._phi_round == round_ or self.step < round_ * h - lead:
            return
        if self.total_steps is not None and round_ * h > self.total_steps:
            return
        self._start_phi(round_)

    def _start_phi(self, round_: int) -> None:
        self._settled = False
        self._phi_round = round_
        self._phi_handles = self._post(self._group(round_), self._wire(self.phi, "phi"), 2 * round_ + _PHI)

    # -- one outer step --------------------------------------------------------------------
    def _group(self, round_: int) -> list[int]:
        return group_of(self.comm.rank, self.comm.peers_in_round(round_), round_, seed=self.seed, group_size=self.cfg.group_size)

    def _wire(self, flats: Flats, kind: str) -> list[torch.Tensor]:
        """Each dtype group's vector as it goes on the wire (Δ through error feedback when on); the error
        compression adds against this round's vector is measured."""
        codec = self.codec if kind == "delta" else self.phi_codec
        if kind == "delta":
            wires = [self.compressor.encode(f"delta/{g}", f) for g, f in enumerate(flats)]
        else:
            wires = [codec.encode(f) for f in flats]
        if codec.name != "none":
            errs = [float((codec.decode(w, f.numel()) - f).norm()) if bool(torch.isfinite(f).all()) else 0.0
                    for w, f in zip(wires, flats)]
            norm = math.hypot(*(float(f.norm()) for f in flats))
            self.wire_error[kind] += math.hypot(*errs) / norm if norm > 0 else 0.0
        return wires

    def _post(self, others: list[int], wires: list[torch.Tensor], tag: int) -> dict[int, Handle]:
        handles = {}
        for j in others:
            try:
                handles[j] = self.comm.exchange(wires, j, tag=tag, timeout=self.cfg.timeout_s, async_op=True)
            except CommError:
                continue  # counted as a failed member when the round finds no handle for it
        return handles

    def _receive(self, handle: Handle | None, deadline: float, like: list[tuple[Flats, Codec]]) -> list[Flats]:
        """Wait (until ``deadline``) for one member's message; decode it (each part by its codec) into
        vectors shaped like ``like``."""
        if handle is None:
            raise CommError("exchange could not be started")
        try:
            wires = handle.wait(timeout=max(deadline - time.monotonic(), 1e-3))
        except PeerTimeout:
            self.abandoned_exchanges += 1
            raise
        out, k = [], 0
        for flats, codec in like:
            out.append([codec.decode(wires[k + i], f.numel()).to(f.dtype) for i, f in enumerate(flats)])
            k += len(flats)
        return out

    @torch.no_grad()
    def sync(self, round_: int) -> None:
        """Outer step ``round_``: meet the group, update δ and φ from the members that answered, θ ← φ."""
        params = self.params
        delta = [t.to(phi.device, non_blocking=True) - phi for t, phi in zip(self._flats(params), self.phi)]
        others = self._group(round_)
        self.group_log = [*self.group_log[-63:], (round_, sorted([self.comm.rank, *others]))]
        separate_phi = self._lead() > 0
        if separate_phi and self._phi_round != round_:  # e.g. a loop that runs past total_steps
            self._start_phi(round_)
        payload = self._wire(delta, "delta")
        if self.compressor.error_feedback:  # our own term is what the others receive from us
            delta = self._own(payload, delta)
        if not separate_phi:
            payload = [*payload, *self._wire(self.phi, "phi")]
        delta_handles = self._post(others, payload, 2 * round_ + _DELTA)
        phi_handles = self._phi_handles if separate_phi else {}
        deadline = time.monotonic() + self.cfg.timeout_s
        received: dict[int, tuple[Flats, Flats]] = {}
        for j in others:
            try:
                if separate_phi:
                    t0 = time.perf_counter()
                    try:
                        (phi_j,) = self._receive(phi_handles.get(j), deadline, [(self.phi, self.phi_codec)])
                    finally:
                        self.phi_wait_s += time.perf_counter() - t0
                t0 = time.perf_counter()
                try:
                    like = [(delta, self.codec)] + ([] if separate_phi else [(self.phi, self.phi_codec)])
                    got = self._receive(delta_handles.get(j), deadline, like)
                finally:
                    self.delta_wait_s += time.perf_counter() - t0
                received[j] = (got[0], phi_j if separate_phi else got[1])
            except (PeerTimeout, BadPeerData, DecodeError, CommError) as e:
                log.warning("noloco outer step %d: rank %d left out of rank %d's means: %s", round_, j, self.comm.rank, e)
        self._phi_handles = {}
        received = self._agreed(others, received)
        self.member_failures += len(others) - len(received)
        if self.robust.active:
            self._robust_update(delta, received, round_)
        else:
            self._update(delta, received)
        self.outer_syncs += 1
        for g in range(len(delta)):
            self.compressor.settle(f"delta/{g}")
        if not received and others:
            self.solo_rounds += 1
        for idx, phi in zip(self.dtype_groups, self.phi):
            group = [params[i] for i in idx]
            torch._foreach_copy_(locals_([p.detach() for p in group]), split_like(phi, group))  # shards: DTensors
        self._settled = True
        if self._changes:  # a round boundary: the next round's φ is not sent yet
            self._apply_changes()

    def _agreed(self, others: list[int], received: dict[int, tuple[Flats, Flats]]) -> dict[int, tuple[Flats, Flats]]:
        """The members every process of a sharded worker heard from (one tiny inner reduction), so all
        its shards mix the same members this round; a worker of one process keeps what it received."""
        inner = self.comm.inner_comm
        if inner is None or inner.world_size == 1 or not others:
            return received
        heard = torch.tensor([1.0 if j in received else 0.0 for j in others])
        inner.all_reduce([heard], op="min")
        return {j: received[j] for j, h in zip(others, heard.tolist()) if h > 0}

    def _own(self, wires: list[torch.Tensor], delta: Flats) -> Flats:
        """Our decoded Δ wire (error feedback: the mean must hold what the members receive from us)."""
        try:
            return [self.codec.decode(w, d.numel()).to(d.dtype) for w, d in zip(wires, delta)]
        except DecodeError:
            return delta  # our own Δ is not finite: it reaches the mean as it is, as without compression

    def _update(self, delta: Flats, received: dict[int, tuple[Flats, Flats]]) -> None:
        gossip_update(self.phi, self.momentum, delta, received, rank=self.comm.rank, alpha=self.cfg.outer_momentum,
                      beta=self.cfg.outer_lr, gamma=self.gamma, nesterov=self.cfg.nesterov)

    def _robust_update(self, delta: Flats, received: dict[int, tuple[Flats, Flats]], round_: int) -> None:
        """`_update` with robust means of Δ and of φ_j − φ_i over the group (own row included)."""
        rank = self.comm.rank
        members = sorted([rank, *received])
        dtype = common_dtype(self.phi)  # the estimators work on one row per member: one dtype

        def row(flats: Flats) -> torch.Tensor:
            return flats[0].to(dtype) if len(flats) == 1 else torch.cat([f.to(dtype) for f in flats])

        own_delta, own_phi = row(delta), row(self.phi)
        rows_delta = torch.stack([own_delta if j == rank else row(received[j][0]) for j in members])
        rows_phi = torch.stack([torch.zeros_like(own_phi) if j == rank else row(received[j][1]) - own_phi for j in members])
        own = float(own_delta.norm())
        mean_delta = aggregate(rows_delta, self.robust, reference=own)
        pull = aggregate(rows_phi, self.robust, reference=own)  # robust mean(φ) − φ_i
        where = f"outer step {round_}"
        self.tracker.round(mean_delta, members, rank=rank, where=where)
        for kind, rows in (("clipped", pull.clipped), ("outliers", pull.outliers)):
            self.tracker.note(kind, [members[i] for i in rows if members[i] != rank], rank=rank, where=where)
        offset = 0
        for phi, mom in zip(self.phi, self.momentum):
            cut = slice(offset, offset + phi.numel())
            offset += phi.numel()
            outer_move(phi, mom, mean_delta.value[cut].to(phi.dtype, copy=True), pull.value[cut].to(phi.dtype, copy=True),
                       alpha=self.cfg.outer_momentum, beta=self.cfg.outer_lr, gamma=self.gamma, nesterov=self.cfg.nesterov)

    # -- state -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "outer_syncs": self.outer_syncs, "solo_rounds": self.solo_rounds, "member_failures": self.member_failures,
            "phi": self._saved(self.phi), "momentum": self._saved(self.momentum),
            "wire_error": dict(self.wire_error), "robust": self.tracker.state_dict(), "compressor": self.compressor.state_dict(),
            "held": list(self.held), "changes": {int(i): bool(h) for i, h in self._changes.items()}, "settled": self._settled,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.outer_syncs = int(state["outer_syncs"])
        self.solo_rounds = int(state["solo_rounds"])
        self.member_failures = int(state["member_failures"])
        held = [bool(h) for h in state.get("held", [True] * len(self.held))]
        if held != self.held:
            self._relayout(held)  # the saved layout: its sizes, then its values below
        self._changes = {int(i): bool(h) for i, h in state.get("changes", {}).items()}
        self._settled = bool(state.get("settled", False))
        for mine, saved in ((self.phi, state["phi"]), (self.momentum, state["momentum"])):
            saved = [saved] if isinstance(saved, torch.Tensor) else saved  # a checkpoint from before dtype groups
            if isinstance(saved, dict):  # per parameter, sharded like the parameters (see `_saved`)
                saved = self._flats(saved["per_param"])
            if len(saved) != len(mine):
                raise ValueError(f"NoLoCo checkpoint holds {len(saved)} dtype groups, this model has {len(mine)}; "
                                 "resume with the model the checkpoint was written by")
            for m, s in zip(mine, saved):
                m.copy_(s)
        self.wire_error = {k: float(v) for k, v in state["wire_error"].items()}
        self.tracker.load_state_dict(state.get("robust"))
        self.compressor.load_state_dict(state.get("compressor"))
        self._phi_round, self._phi_handles = -1, {}

    def _saved(self, flats: Flats) -> Any:
        """φ or δ for a checkpoint: a copy of each dtype group's flat vector; with sharded (DTensor)
        parameters one tensor per parameter, sharded like it, so a checkpoint reshards (dtrain.hierarchy)."""
        if not any(hasattr(p, "device_mesh") for p in self.params):
            return [f.clone() for f in flats]
        if not all(self.held):
            raise ValueError("NoLoCo: released parameters (LISA) and sharded parameters do not compose")
        pieces: dict[int, torch.Tensor] = {}
        for flat, idx in zip(flats, self.dtype_groups):
            params = [self.params[i] for i in idx]
            for i, piece, p in zip(idx, split_like(flat, params), params):
                pieces[i] = like(piece.clone(), p)
        return {"per_param": [pieces[i] for i in range(len(self.params))]}

    def report(self) -> dict[str, Any]:
        rounds = max(self.outer_syncs, 1)
        return {
            **super().report(),
            "outer_syncs": self.outer_syncs, "solo_rounds": self.solo_rounds, "member_failures": self.member_failures,
            "phi_wait_s": self.phi_wait_s, "delta_wait_s": self.delta_wait_s, "abandoned_exchanges": self.abandoned_exchanges,
            "compression": self.cfg.compression, "error_feedback": self.cfg.error_feedback,
            **state_report(self.cfg.outer_device, [*self.phi, *self.momentum, *self.compressor.tensors()]),
            "groups": [[r, g] for r, g in self.group_log],
            "wire_rel_error_delta": self.wire_error["delta"] / rounds, "wire_rel_error_phi": self.wire_error["phi"] / rounds,
            **({"robust": self.tracker.report()} if self.robust.active else {}),
        }


attach = NoLoCo.attach  # what `dtrain train` calls: NoLoCo(ctx.optimizer, ctx.comm, cfg.algo, seed=..., total_steps=...)
