"""Shared-seed SPSA (MeZO + Just One Byte): forward-only training that sends one byte per step.

Each step, for each of K perturbations, worker i draws z from a generator seeded by
(run seed, step, i, k, parameter index), perturbs in place θ += εz → loss⁺, θ −= 2εz → loss⁻,
θ += εz (exact: see `spsa_noise`), and g = (loss⁺ − loss⁻)/(2ε). The K projected gradients go
on the wire as one byte each (`spsa_quant`); every worker, the sender included, decodes all
N·K bytes and applies θ ← θ(1 − lr·wd) − lr·Σ_j ĝ_j z_j / (N·K) regenerating each z_j, so
replicas stay bit-identical without ever sending weights. Forwards run under torch.no_grad and
nothing calls backward: no ``.grad`` is allocated. Memory is inference plus one z chunk.

Usable from any loop: ``opt = SPSA(model.parameters(), comm, lr=1e-5); opt.step(closure)``
with ``closure()`` returning the loss. `SPSA` is a torch Optimizer: its lr lives in its own
``param_groups``, so torch LR schedulers act on it directly (`dtrain train` builds its
optim.schedule scheduler over it), and ``state_dict``/``load_state_dict`` are the standard ones
(step counters and seed ride in them). Only parameters with ``requires_grad`` are perturbed at
each step (LISA, LoRA-like subsets). Weight decay skips 1-D tensors (biases, norm gains).
`Config` holds every option and its default; ``seed`` is a fact of the run (`dtrain train`
passes its run seed), not an option.

Replica agreement: every ``check_every`` steps (and whenever ``comm.peers()`` changes) workers
all-gather an 8-byte hash of all weights and the step; on a mismatch every worker adopts the
majority's weights and step by `Comm.broadcast` (counted as ``resyncs`` in `report()`).
Joining: weights are not optimizer state. `dtrain train` hands a newcomer the model's and this
optimizer's state dicts through the comm's join path (`Comm.fetch_state`/`serve_state`); in your
own loop load the model and ``state_dict()`` the same way, or let every worker call
`sync_from(src)` (a broadcast) when one arrives; `SPSA.join` makes a newcomer ask for that at its
first step. With the torch backend the group is fixed: a worker that leaves means a restart from
the last checkpoint with the new world size (replicas are identical, so every rank's checkpoint
holds the same weights).
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from dtrain.algorithms import spsa_noise as noise
from dtrain.algorithms import spsa_quant as quant
from dtrain.algorithms.base import AttachContext, Attached, make_config
from dtrain.comm.base import Comm

log = logging.getLogger(__name__)
DIGEST_BYTES = 8


@dataclass
class Config:
    name: str = "spsa"
    lr: float = 1e-6  # dtrain train: optim.lr (its schedule acts on this optimizer's param_groups)
    eps: float = 1e-3  # perturbation scale ε (MeZO default)
    perturbations: int = 1  # K per worker per step: K bytes sent per step
    weight_decay: float = 0.0  # decoupled, matrices only (MeZO skips biases and norms)
    quantize: bool = True  # false: send float64 (8 bytes) per estimate
    quant_scale: float = quant.DEFAULT_SCALE
    exact_restore: bool = True  # grid-snapped perturbations: bit-exact restore, replicas identical
    check_every: int = 100  # replica hash check interval in steps; 0 = never
    broadcast_init: bool = True  # rank 0's weights to everyone at construction
    chunk_numel: int = noise.DEFAULT_CHUNK  # elements of z drawn at a time (the only memory SPSA adds)

    def validate(self) -> None:
        """One-line ValueError naming the key; works on a DictConfig section too (attributes only)."""
        if self.lr < 0:
            raise ValueError(f"lr must be >= 0, got {self.lr}")
        if not self.eps > 0:
            raise ValueError(f"algo.eps must be > 0, got {self.eps}")
        if self.perturbations < 1:
            raise ValueError(f"algo.perturbations must be >= 1, got {self.perturbations}")
        if self.weight_decay < 0:
            raise ValueError(f"algo.weight_decay must be >= 0, got {self.weight_decay}")
        if not self.quant_scale > 0:
            raise ValueError(f"algo.quant_scale must be > 0, got {self.quant_scale}")
        if self.check_every < 0:
            raise ValueError(f"algo.check_every must be >= 0 (0 disables), got {self.check_every}")
        if self.chunk_numel < 1:
            raise ValueError(f"algo.chunk_numel must be >= 1, got {self.chunk_numel}")


validate = Config.validate  # dtrain.config calls it on the algo section

# dtrain train: SPSA is the optimizer, so these optim.* keys would be ignored (refused when set).
REPLACES = {"optim": {
    "name": "SPSA is the optimizer", "preset": "SPSA is the optimizer", "betas": "SPSA is the optimizer",
    "momentum": "SPSA is the optimizer", "eps": "SPSA is the optimizer (its perturbation scale is algo.eps)",
    "kwargs": "SPSA is the optimizer", "weight_decay": "SPSA is the optimizer; set algo.weight_decay",
    "grad_clip": "SPSA computes no gradients to clip",
}}
# dtrain train sets these Config fields from its own keys; they are not keys of the algo section.
LOOP_SETS = {"lr": "optim.lr"}


class SPSA(torch.optim.Optimizer):
    """Forward-only optimizer: ``step(closure)`` runs 2·K forwards and one K-byte all-gather.

    Per worker per step on the wire: K bytes (8·K unquantized), plus a 9-byte hash message every
    ``check_every`` steps. Extra memory over inference: one ``chunk_numel`` z buffer per dtype.
    """

    def __init__(self, params: Iterable[torch.Tensor] | Iterable[dict[str, Any]], comm: Comm, cfg: Config | None = None,
                 *, seed: int = 0, **overrides: Any) -> None:
        self.cfg = make_config(Config, cfg, overrides, owner="SPSA")
        c = self.cfg
        super().__init__(params, {"lr": c.lr, "weight_decay": c.weight_decay})
        self.comm = comm
        self.eps = float(c.eps)
        self.perturbations = c.perturbations
        self.seed = int(seed)
        self.quantized = c.quantize
        self.quant_scale = float(c.quant_scale)
        self.exact_restore = c.exact_restore
        self.check_every = c.check_every
        self.chunk_numel = c.chunk_numel
        # Seeds use a parameter's position in this fixed list, so a subset (requires_grad) never shifts z.
        # Groups by index: torch's load_state_dict replaces the param_groups dicts.
        self._params: list[tuple[torch.Tensor, int]] = []
        seen: set[int] = set()
        for gi, group in enumerate(self.param_groups):
            for p in group["params"]:
                if id(p) in seen:
                    continue
                if not p.is_contiguous():
                    raise ValueError("SPSA needs contiguous parameters; call .data = p.data.contiguous() first")
                seen.add(id(p))
                self._params.append((p, gi))
        self.steps_done = 0
        self.estimates_sent = 0
        self.skipped_estimates = 0
        self.hash_checks = 0
        self.resyncs = 0
        self.last_mismatched: list[int] = []
        self.last_grads: list[float] = []
        self._joining = False
        self._peers = tuple(comm.peers())
        if c.broadcast_init and comm.world_size > 1:
            self.sync_from(0, count=False)

    @classmethod
    def join(cls, params: Iterable[torch.Tensor], comm: Comm, cfg: Config | None = None, *, seed: int = 0, **overrides: Any) -> SPSA:
        """A newcomer: its first step starts with a replica check that fetches the majority's state.

        The others run that check when they see ``comm.peers()`` change (elastic backends), so
        both sides enter the same collective. Never broadcasts its own (stale) weights at init.
        """
        opt = cls(params, comm, cfg, seed=seed, **{**overrides, "broadcast_init": False})
        opt._joining = True
        return opt

    # -- the step ------------------------------------------------------------------
    def _active(self) -> list[tuple[int, torch.Tensor, dict[str, Any]]]:
        return [(i, p, self.param_groups[g]) for i, (p, g) in enumerate(self._params) if p.requires_grad]

    def _buffers(self, active: list[tuple[int, torch.Tensor, dict[str, Any]]]) -> dict[tuple[torch.dtype, torch.device], torch.Tensor]:
        """One z chunk buffer per (dtype, device): the only memory SPSA adds to inference."""
        sizes: dict[tuple[torch.dtype, torch.device], int] = {}
        for _, p, _ in active:
            key = (p.dtype, p.device)
            sizes[key] = max(sizes.get(key, 0), min(p.numel(), self.chunk_numel))
        return {key: torch.empty(n, dtype=key[0], device=key[1]) for key, n in sizes.items()}

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor | float]) -> float:  # type: ignore[override]
        """One SPSA step; returns the mean of loss⁺ and loss⁻ over this worker's perturbations."""
        if closure is None:
            raise ValueError("SPSA.step needs a closure returning the loss (it runs forward passes only)")
        peers = tuple(self.comm.peers())
        if self._joining or peers != self._peers:
            self._peers = peers
            self.check_replicas(joining=self._joining)
            self._joining = False
        active = self._active()
        bufs = self._buffers(active)
        grids: dict[int, float | None] = {}
        for i, p, _ in active:
            if self.exact_restore:
                grids[i] = noise.grid_step(p, self.eps, self.chunk_numel)
                noise.snap(p, grids[i], self.chunk_numel)
            else:
                grids[i] = None
        rank = self.comm.rank
        grads, losses = [], []
        for k in range(self.perturbations):
            seeds = {i: noise.direction_seed(self.seed, self.steps_done, rank, k, i) for i, _, _ in active}
            self._perturb(active, seeds, grids, bufs, factor=1.0)
            loss_plus = float(closure())
            self._perturb(active, seeds, grids, bufs, factor=-2.0)
            loss_minus = float(closure())
            self._perturb(active, seeds, grids, bufs, factor=1.0)
            pair = [loss_plus, loss_minus]
            losses.extend(pair)
            grads.append((loss_plus - loss_minus) / (2 * self.eps))
        self.last_grads = grads
        payload = quant.encode(grads, quantized=self.quantized, scale=self.quant_scale)
        self.estimates_sent += len(grads)
        gathered = self.comm.all_gather_bytes(payload)
        self._apply(active, gathered, bufs)
        self.steps_done += 1
        if self.check_every and self.steps_done % self.check_every == 0:
            self.check_replicas()
        mean = sum(losses) / len(losses)
        return mean if math.isfinite(mean) else float("nan")

    def _perturb(self, active: list[tuple[int, torch.Tensor, dict[str, Any]]], seeds: dict[int, int],
                 grids: dict[int, float | None], bufs: dict[Any, torch.Tensor], *, factor: float) -> None:
        for i, p, _ in active:
            gen = noise.direction_generator(p.device, seeds[i])
            noise.perturb(p, gen, bufs[(p.dtype, p.device)], eps=self.eps, factor=factor, h=grids[i], chunk_numel=self.chunk_numel)

    def _estimates(self, gathered: list[bytes]) -> list[tuple[int, int, float]]:
        """(worker, perturbation, ĝ) for every valid estimate, in rank order (identical everywhere)."""
        out = []
        for worker, blob in enumerate(gathered):
            try:
                values = quant.decode(blob, self.perturbations, quantized=self.quantized, scale=self.quant_scale)
            except ValueError:
                # A malformed payload: every worker sees the same bytes, so every worker drops it.
                self.skipped_estimates += self.perturbations
                continue
            for k, g in enumerate(values):
                if g is None:
                    self.skipped_estimates += 1
                else:
                    out.append((worker, k, g))
        return out

    def _apply(self, active: list[tuple[int, torch.Tensor, dict[str, Any]]], gathered: list[bytes], bufs: dict[Any, torch.Tensor]) -> None:
        estimates = self._estimates(gathered)
        for i, p, group in active:
            lr = group["lr"]
            wd = group["weight_decay"] if p.dim() >= 2 else 0.0
            todo = [(w, k, g) for w, k, g in estimates if g != 0.0] if lr else []
            if not todo and not (wd and lr):
                continue
            if wd and lr:
                p.mul_(1.0 - lr * wd)
            gens = [noise.direction_generator(p.device, noise.direction_seed(self.seed, self.steps_done, w, k, i))
                    for w, k, _ in todo]
            coefs = [-lr * g / len(estimates) for _, _, g in todo]
            noise.apply_directions(p, gens, coefs, bufs[(p.dtype, p.device)], chunk_numel=self.chunk_numel)
            if self.exact_restore:  # weights at rest stay on their grid: the next step's snap is a no-op
                noise.snap(p, noise.grid_step(p, self.eps, self.chunk_numel), self.chunk_numel)

    # -- replica agreement and membership -------------------------------------------------
    def params_digest(self) -> bytes:
        return noise.params_digest([p for p, _ in self._params], self.steps_done)

    @torch.no_grad()
    def check_replicas(self, *, joining: bool = False) -> bool:
        """Collective: compare weight hashes; on a mismatch adopt the majority's state. True if resynced."""
        self.hash_checks += 1
        got = self.comm.all_gather_bytes(self.params_digest() + bytes([1 if joining else 0]))
        votes = [(rank, blob[:DIGEST_BYTES]) for rank, blob in enumerate(got)
                 if len(blob) == DIGEST_BYTES + 1 and blob[DIGEST_BYTES] == 0]
        if not votes:  # only newcomers: the lowest rank's state wins
            votes = [(rank, blob[:DIGEST_BYTES]) for rank, blob in enumerate(got) if len(blob) == DIGEST_BYTES + 1]
        counts = Counter(d for _, d in votes)
        best = max(counts.values())
        src, digest = next((r, d) for r, d in votes if counts[d] == best)  # ties: lowest rank
        # b"" marks a rank that has left (elastic backends): absent, not disagreeing.
        mismatched = [r for r, blob in enumerate(got) if blob and (blob[:DIGEST_BYTES] != digest or len(blob) != DIGEST_BYTES + 1)]
        if not mismatched:
            return False
        self.resyncs += 1
        self.last_mismatched = mismatched
        if self.comm.rank == 0 or self.comm.rank in mismatched:
            log.warning("SPSA replicas disagree at step %d (workers %s); resyncing from worker %d",
                        self.steps_done, mismatched, src)
        self.sync_from(src, count=False)
        return True

    @torch.no_grad()
    def sync_from(self, src: int, *, count: bool = True) -> None:
        """Collective: every worker takes ``src``'s weights and step counter (a broadcast)."""
        params = [p for p, _ in self._params]
        for dtype in sorted({p.dtype for p in params}, key=str):
            self.comm.broadcast([p for p in params if p.dtype == dtype], src=src)
        step = torch.tensor([float(self.steps_done)], dtype=torch.float64)
        self.comm.broadcast([step], src=src)
        self.steps_done = int(step.item())
        if count:
            self.resyncs += 1

    # -- state ------------------------------------------------------------------------------
    _COUNTERS = ("steps_done", "estimates_sent", "skipped_estimates", "hash_checks", "resyncs")

    def state_dict(self) -> dict[str, Any]:
        """torch's optimizer state dict (param_groups with lr and weight_decay) plus SPSA's counters."""
        state = super().state_dict()
        state["spsa"] = {"seed": self.seed, **{k: getattr(self, k) for k in self._COUNTERS}}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state["spsa"]
        if int(saved["seed"]) != self.seed:
            raise ValueError(f"SPSA state has seed {saved['seed']} but this run uses seed {self.seed}; use the same seed")
        super().load_state_dict({k: v for k, v in state.items() if k != "spsa"})
        for key in self._COUNTERS:
            setattr(self, key, int(saved[key]))

    def report(self) -> dict[str, Any]:
        per_estimate = quant.bytes_per_estimate(quantized=self.quantized)
        return {
            "steps": self.steps_done, "payload_bytes_per_step": per_estimate * self.perturbations,
            "estimates_sent": self.estimates_sent, "skipped_estimates": self.skipped_estimates,
            "hash_checks": self.hash_checks, "resyncs": self.resyncs, "last_mismatched": self.last_mismatched,
            "param_digest": self.params_digest().hex(),
        }


def make_optimizer(cfg: Any, model: torch.nn.Module, comm: Comm, *, lr: float | None, seed: int) -> SPSA:
    """`dtrain train`'s optimizer under algo.name=spsa: SPSA itself over every model parameter, lr
    from optim.lr (the loop's scheduler then drives it), the run's seed."""
    return SPSA(list(model.parameters()), comm, cfg, seed=seed, **({} if lr is None else {"lr": lr}))


def attach(cfg: Any, ctx: AttachContext) -> Attached:
    """The loop's forward-only path: ``ctx.optimizer`` is the SPSA `make_optimizer` built."""
    if not isinstance(ctx.optimizer, SPSA):
        raise TypeError("algo.name=spsa attaches to the SPSA optimizer that spsa.make_optimizer builds")
    return Attached(algorithm=ctx.optimizer, forward_only=True)
