"""HDET (arXiv 2604.24708): hyperparameter-divergent replicas with an auto-LR controller.

`HDET` is a drop-in for ``torch.optim.lr_scheduler.OneCycleLR`` (same arguments, same curve when
exploration is off) that also runs the ensemble:

- fan-out: replica r of N trains alone with multiplier ρ_r = 1 + a·(r − (N−1)/2)/max((N−1)/2, 0.5)
  on each explored hyperparameter (lr by default); multipliers average 1, lie in [1 − a, 1 + a],
  and are re-dealt to replicas at every converge step by a permutation drawn from a generator
  seeded with ``seed + converge index`` (every replica draws the same one, nobody talks);
- converge: every T steps the parameters found through the optimizer's param_groups are averaged
  (one all-reduce per dtype; a replica whose tensors went non-finite is left out of the mean and
  receives it), optionally the optimizer state too;
- auto-LR: after a warm-up, at each converge step the interval's mean losses L_r are shared (one
  small all-reduce), s_r = (mean L − L_r)/σ, w = softmax(s), Δ = Σ w_r h_r − mean h_r,
  v ← b·v + (1 − b)·Δ, h̄ ← h̄·(1 − γ) + λ·v. For the lr, γ decays h̄ towards OneCycle's floor
  min_lr = max_lr/(div_factor·final_div_factor): γ = 1 − exp(−ln(h̄_w/min_lr)/K), K = (S − S_w)/T,
  with h̄_w the base lr when the controller starts, so with no loss signal the base lr lands on
  the floor at the last step and never passes it. (With the paper's ratio div/final_div < 1, γ is
  negative and the lr grows instead.) After the warm-up the lr is h̄·ρ, held between converges.
  With one replica or spread 0 the controller has nothing to compare and stays off: the curve is
  exactly OneCycleLR's.

Options beyond those equations (off by default; `benchmarks/hdet.py` uses them):

- ``spacing="log"``: ρ_r = (1 + a)^u_r with u_r = (r − (N−1)/2)/max((N−1)/2, 0.5), geometric mean 1, in
  [1/(1 + a), 1 + a]; a may exceed 1 (a = 1: ×½ … ×2), so a 10× error is within a few moves' reach.
- ``auto_lr_mode="scale"``: the controller scales the schedule instead of replacing it. Each replica
  runs c·ρ_r × (OneCycle's lr; or the initial value of another explored key), and at each converge
  step Δ = Σ w_r ln ρ_r − mean ln ρ_r, v ← b·v + (1 − b)·Δ, ln c ← ln c + λ·v (c within
  [10⁻³, 10³]). There is no γ: the curve's own anneal takes the lr to c × its floor.
- ``auto_lr_window=W``: only the losses of the last W steps of each interval count (right after an
  average the replicas have not diverged yet, so the early steps carry no signal, only noise).
- ``auto_lr_stop=S`` (with auto-LR on): converge steps after step S no longer move the controller
  (v = 0; the additive mode's decay goes on) and from step S every multiplier is 1 (fan-in). Stopping
  at the end of the warm-up ramp keeps the controller out of the anneal, where the short-horizon bias
  is strongest (over T steps the lower lr shows the lower loss, though it is not the better peak for
  the whole run). It does not remove the bias: on char_lm, started at the sweep's best max_lr and
  scored by training losses, the controller still lowers the peak (`benchmarks/results/hdet.txt`).

- ``probe=fn`` (``algo.probe_batches`` in `dtrain train`): ``fn(converge_index) -> loss`` scores this
  replica's model on batches that every replica picks the same way (same index, same batches). While
  the controller steers, each replica is scored by the probe at the mean of its parameters over the
  interval, instead of by its own training losses: a paired comparison without the batch-to-batch
  noise, and without the oscillation that makes a larger lr look worse over T steps. It costs one
  extra copy of the parameters and the probe's forward passes, only while steering. See
  `dtrain.algorithms.hdet_probe`. On char_lm (`benchmarks/hdet.py`) it turns the controller's pull
  from downwards to slightly upwards (from the best max_lr: c = 1.7 instead of falling), and from a
  max_lr 10× too low it finds c = 7.4. What it cannot see is a max_lr 10× too high: the damage is
  done in the first ~10 steps, where every short comparison still favours the higher lr.

- ``select_steps=S`` with ``select_range=R`` (scale mode): a selection start. Until step S the
  replicas train apart (no averaging, no gradient sync, nothing sent) at c = R^u_r, u_r evenly in
  [−1, 1] (R = 10, 4 replicas: ×1/10, ×0.46, ×2.15, ×10 of the whole OneCycle curve); at step S each
  is scored (probe at its current parameters, else its last interval's training losses), and every
  replica takes the best one's parameters, whole optimizer state and c, then training goes on as
  usual (gradient sync, if asked for, starts there). Why: a max_lr that is too high does its damage
  in the first few steps, and a comparison between replicas that were averaged every T steps cannot
  see it (all share the damage); replicas that ran apart from step 0 can — on char_lm at S = 10% the
  too-high ones have stalled. Set ``auto_lr_stop=S`` to stop exploring there (what
  `benchmarks/hdet.py` measures), or later to let the controller refine c. The optimizer state is
  taken through ``state_dict``, so numbers kept outside the state tensors travel too (Prodigy's d in
  the param groups, Mechanic's tuner and its base optimizer's state).

Between converge steps nothing is communicated (the paper's code all-reduces gradients every step;
``grad_sync=True`` does that too, for users who want HDET on top of DDP).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from dtrain.algorithms.base import AttachContext, Attached
from dtrain.algorithms.hdet_controller import check_hdet_args, check_select_args, decay_rate, multipliers, softmax_weights
from dtrain.algorithms.hdet_scheduler import HDET

__all__ = ["HDET", "Config", "HDETRun", "attach", "decay_rate", "multipliers", "shared_batch_probe", "softmax_weights",
           "validate"]


# -- `dtrain train` -------------------------------------------------------------------------------
@dataclass
class Config:
    name: str = "hdet"
    spread: float = 0.5  # a; the paper's 1/9 is for 8 replicas and 1e5-step warm-ups
    converge_every: int = 25  # T
    auto_lr: bool = True
    auto_lr_warmup: int | None = None  # steps; None = 10% of the run
    auto_lr_beta: float = 0.9
    auto_lr_sigma: float = 0.02  # σ in loss units (nats): char_lm replicas differ by a few hundredths
    auto_lr_gain: float = 0.5
    auto_lr_mode: str = "additive"  # additive (DESIGN's base-lr controller) | scale (c × the OneCycle curve)
    auto_lr_window: int | None = None  # last steps of each interval whose loss counts; None = all T
    auto_lr_stop: int | None = None  # step from which the loss no longer steers (None = never)
    probe_batches: int = 0  # >0: score replicas on this many shared held-out training batches (see HDET probe)
    select_steps: int = 0  # >0: replicas start apart at c = select_range^u (u in [-1, 1]); the best is taken here
    select_range: float = 10.0  # how far off max_lr may be, either way, for the selection start
    spacing: str = "linear"  # multipliers 1 ± a (linear) or (1 + a)^±1 (log)
    explore: list[str] = field(default_factory=lambda: ["lr"])
    per_group: bool = False
    reshuffle: bool = True
    average_optimizer_state: bool = False
    grad_sync: bool = False
    broadcast_init: bool = True
    pct_start: float = 0.3
    anneal_strategy: str = "cos"
    cycle_momentum: bool = False
    base_momentum: float = 0.85
    max_momentum: float = 0.95
    div_factor: float = 25.0
    final_div_factor: float = 1e4
    three_phase: bool = False


def validate(cfg: Config) -> None:
    try:
        check_hdet_args(cfg.spread, cfg.converge_every, cfg.auto_lr_warmup, cfg.auto_lr_beta, cfg.auto_lr_sigma,
                        cfg.auto_lr_gain, spacing=cfg.spacing, mode=cfg.auto_lr_mode, window=cfg.auto_lr_window,
                        stop=cfg.auto_lr_stop)
    except ValueError as e:
        raise ValueError(f"algo.{e}") from None
    if not 0 <= cfg.pct_start <= 1:
        raise ValueError(f"algo.pct_start must be in [0, 1], got {cfg.pct_start}")
    if cfg.anneal_strategy not in ("cos", "linear"):
        raise ValueError(f"algo.anneal_strategy must be cos or linear, got {cfg.anneal_strategy!r}")
    if cfg.div_factor <= 0 or cfg.final_div_factor <= 0:
        raise ValueError("algo.div_factor and algo.final_div_factor must be > 0")
    try:
        check_select_args(cfg.select_steps, cfg.select_range, mode=cfg.auto_lr_mode, total=2**62)
    except ValueError as e:
        raise ValueError(f"algo.{e}") from None
    if int(cfg.probe_batches) != cfg.probe_batches or cfg.probe_batches < 0:
        raise ValueError(f"algo.probe_batches must be an integer >= 0 (0 = score replicas by their training losses), got {cfg.probe_batches}")
    if not cfg.explore:
        raise ValueError("algo.explore must list at least one param-group key (e.g. [lr])")


class HDETRun:
    """What `dtrain train` checkpoints and reports beside the scheduler (which holds all state)."""

    def __init__(self, scheduler: HDET) -> None:
        self.scheduler = scheduler

    @property
    def skipped_steps(self) -> int:
        hook = self.scheduler._grad_sync
        return hook.skipped_steps if hook is not None else 0

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def report(self) -> dict[str, Any]:
        s = self.scheduler
        has_lr = any(k.name == "lr" for k in s.knobs)
        return {"converges": s.converges, "multipliers": s.rho, "base_lr": s.base_values("lr") if has_lr else None,
                "lr_scale": s.scale_values("lr") if has_lr and s.mode == "scale" else None,
                "final_lr": [g["lr"] for g in s.optimizer.param_groups],
                "last_scores": s.log[-1]["losses"] if s.log else None}


def shared_batch_probe(ctx: AttachContext, batches: int) -> Callable[[int], float]:
    """A probe for the workload: mean loss over ``batches`` training batches no step trains on.

    Batch indices start past the run's last step and depend only on the converge index, so every
    replica scores itself on the same batches. Evaluated in eval mode (no dropout noise).
    """
    if ctx.workload is None:
        raise ValueError("algo.probe_batches needs a workload to draw probe batches from; set it to 0")
    workload, model = ctx.workload, ctx.model

    def probe(index: int) -> float:
        was_training = model.training
        model.eval()
        try:
            first = ctx.total_steps + 1 + index * batches
            return sum(float(workload.loss(model, workload.train_batch(first + i, 0, 1))) for i in range(batches)) / batches
        finally:
            model.train(was_training)

    return probe


def attach(cfg: Config, ctx: AttachContext) -> Attached:
    validate(cfg)
    scheduler = HDET(
        ctx.optimizer, ctx.lr, total_steps=ctx.total_steps, pct_start=float(cfg.pct_start),
        anneal_strategy=cfg.anneal_strategy, cycle_momentum=cfg.cycle_momentum, base_momentum=cfg.base_momentum,
        max_momentum=cfg.max_momentum, div_factor=cfg.div_factor, final_div_factor=cfg.final_div_factor,
        three_phase=cfg.three_phase, spread=cfg.spread, converge_every=cfg.converge_every, auto_lr=cfg.auto_lr,
        auto_lr_warmup=cfg.auto_lr_warmup, auto_lr_beta=cfg.auto_lr_beta, auto_lr_sigma=cfg.auto_lr_sigma,
        auto_lr_gain=cfg.auto_lr_gain, auto_lr_mode=cfg.auto_lr_mode, auto_lr_window=cfg.auto_lr_window,
        auto_lr_stop=cfg.auto_lr_stop, spacing=cfg.spacing, explore=list(cfg.explore), per_group=cfg.per_group, reshuffle=cfg.reshuffle,
        average_optimizer_state=cfg.average_optimizer_state, grad_sync=cfg.grad_sync,
        broadcast_init=cfg.broadcast_init, seed=ctx.seed, comm=ctx.comm,
        probe=shared_batch_probe(ctx, cfg.probe_batches) if cfg.probe_batches else None,
        select_steps=cfg.select_steps, select_range=cfg.select_range,
    )
    return Attached(algorithm=HDETRun(scheduler), scheduler=scheduler, scheduler_takes_loss=True)
