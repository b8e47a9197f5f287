"""HDET (arXiv 2604.24708): hyperparameter-divergent replicas with an auto-LR controller.

`HDET` is a drop-in for ``torch.optim.lr_scheduler.OneCycleLR``: same arguments (torch's defaults),
and with no comm (one replica) the same lr and momentum at every step. With a comm it also runs the
ensemble; its options (`Config`, in `dtrain.algorithms.hdet_config`, the only place their defaults
live) are keywords or ``cfg=``:

    HDET(opt, max_lr=3e-3, total_steps=10_000)                        # OneCycleLR, exactly
    HDET(opt, max_lr=3e-3, total_steps=10_000, comm=comm)             # + replicas, on the curve until evidence
    HDET(opt, max_lr=3e-3, total_steps=10_000, comm=comm, auto_lr_mode="select", grad_sync=True, probe=fn)
                                                                      # max_lr unsure by up to 10x

Defaults that are safe as a drop-in: with a comm, each replica runs ρ_r × OneCycleLR's lr (ρ_r within
the spread, 1 ± 0.2) and the controller (``auto_lr_mode="scale"``: c × the curve, c = 1 at start)
moves c only once the rounds pass a significance test at level ``auto_lr_alpha`` = 0.05 (a test by
betting on the sign of each round's loss-vs-multiplier slope, valid however many rounds are looked
at; see `dtrain.algorithms.hdet_controller`): until then the lr stays within the spread of
OneCycleLR's curve. Losses that do not depend on the multiplier open the gate with probability at
most α over the whole run. ``auto_lr_alpha=None`` steers from the first round (the paper's way).
``auto_lr_mode="select"`` is the form `benchmarks/hdet.py` measures best from a max_lr up to 10x off
(see below); ``"additive"`` is DESIGN's base-lr controller (also gated by the test).

The method:

- fan-out: replica r of N trains alone with multiplier ρ_r = 1 + a·(r − (N−1)/2)/max((N−1)/2, 0.5)
  on each explored hyperparameter (lr by default); multipliers average 1, lie in [1 − a, 1 + a],
  and are re-dealt to replicas at every converge step by a permutation drawn from a generator
  seeded with ``seed + converge index`` (every replica draws the same one, nobody talks);
- converge: every T steps the parameters found through the optimizer's param_groups are averaged
  (one all-reduce per dtype; a replica whose tensors went non-finite is left out of the mean and
  receives it), optionally the optimizer state too;
- auto-LR, ``auto_lr_mode="additive"`` (DESIGN's equations): after a warm-up, at each converge step
  the interval's mean losses L_r are shared (one
  small all-reduce), s_r = (mean L − L_r)/σ, w = softmax(s), Δ = Σ w_r h_r − mean h_r,
  v ← b·v + (1 − b)·Δ, h̄ ← h̄·(1 − γ) + λ·v. For the lr, γ decays h̄ towards OneCycle's floor
  min_lr = max_lr/(div_factor·final_div_factor): γ = 1 − exp(−ln(h̄_w/min_lr)/K), K = (S − S_w)/T,
  with h̄_w the base lr when the controller starts, so with no loss signal the base lr lands on
  the floor at the last step and never passes it. (With the paper's ratio div/final_div < 1, γ is
  negative and the lr grows instead.) After the warm-up the lr is h̄·ρ, held between converges.
  With one replica or spread 0 the controller has nothing to compare and stays off: the curve is
  exactly OneCycleLR's. Why it is not the default: that decay replaces OneCycle's cosine at once
  (geometric, far below it), and an ungated controller acts on noise; together they cut the lr
  10-100x right after the warm-up (issue 14). With the test, the base takes over from the curve
  only once the rounds pass it.

Options beyond those equations (`benchmarks/hdet.py` measures them; figures in the README):

- ``spacing="log"``: ρ_r = (1 + a)^u_r with u_r = (r − (N−1)/2)/max((N−1)/2, 0.5), geometric mean 1, in
  [1/(1 + a), 1 + a]; a may exceed 1 (a = 1: ×½ … ×2), so a 10× error is within a few moves' reach.
- ``auto_lr_mode="scale"`` (the default): the controller scales the schedule instead of replacing
  it. Each replica runs c·ρ_r × (OneCycle's lr; or the initial value of another explored key), and at each converge
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
  from downwards to slightly upwards, and from a max_lr 10× too low it raises c most of the way
  (both measured ungated: ``auto_lr_alpha=None``). What it cannot see is a max_lr 10× too high: the
  damage is done in the first steps, where every short comparison still favours the higher lr.

- ``auto_lr_mode="select"`` (``select_steps=S``, default 10% of the run, with ``select_range=R``): a
  selection start; ``auto_lr_stop`` defaults to S there (the scale mode with ``select_steps`` > 0 does
  the same selection and leaves ``auto_lr_stop`` as given). Until step S the
  replicas train apart (no averaging, no gradient sync, nothing sent) at c = R^u_r, u_r evenly in
  [−1, 1] (R = 10, 4 replicas: ×1/10, ×0.46, ×2.15, ×10 of the whole OneCycle curve); at step S each
  is scored (probe at its current parameters, else its last interval's training losses), and every
  replica takes the best one's parameters, whole optimizer state and c, then training goes on as
  usual (gradient sync, if asked for, starts there). Why: a max_lr that is too high does its damage
  in the first few steps, and a comparison between replicas that were averaged every T steps cannot
  see it (all share the damage); replicas that ran apart from step 0 can — on char_lm at S = 10% the
  too-high ones have stalled. Exploring stops at S (what `benchmarks/hdet.py` measures); a later
  ``auto_lr_stop`` lets the controller refine c. The selection itself is not gated by the test: it
  is asked for, and a wrong max_lr does its damage before any test could pass. The optimizer state is
  taken through ``state_dict``, so numbers kept outside the state tensors travel too (Prodigy's d in
  the param groups, Mechanic's tuner and its base optimizer's state).

- ``select_grid="odd"`` puts ×1 on the selection's grid (4 replicas: ×1/10, ×1, ×1, ×10), so a max_lr
  that is already right is kept unless another factor beats it; ``select_rounds=k`` splits the start
  into k rounds, round j's grid centred on the last winner with range R^(1/2^j) (see
  `dtrain.algorithms.hdet_select`). Which form to use depends on the outer algorithm (measured in
  `benchmarks/hdet.py`, README): the odd grid in one round over DiLoCo, two rounds over NoLoCo.

- ``outer="diloco"`` / ``"noloco"`` (``outer_options``: that algorithm's keys; `dtrain train`:
  ``algo=[hdet,diloco]``): the replicas are DiLoCo or NoLoCo workers and the converge step is the outer
  algorithm's own step (Nesterov on the mean outer gradient, or NoLoCo's pair step) instead of plain
  averaging; HDET reads the probe at those boundaries and adds only its scores (a few floats per round)
  to the outer algorithm's bytes. See `dtrain.algorithms.hdet_outer`:

      HDET(opt, max_lr, total_steps, comm=comm, outer="diloco", converge_every=H, auto_lr_mode="select",
           select_grid="odd", probe=fn)       # a max_lr 10x off, at DiLoCo's bytes

Between converge steps nothing is communicated (the paper's code all-reduces gradients every step;
``grad_sync=True`` does that too, for users who want HDET on top of DDP).
"""

from __future__ import annotations

from typing import Callable

from dtrain.algorithms.base import AttachContext, Attached
from dtrain.algorithms.hdet_config import Config
from dtrain.algorithms.hdet_controller import decay_rate, multipliers, softmax_weights
from dtrain.algorithms.hdet_scheduler import HDET

__all__ = ["HDET", "REPLACES", "REPLACES_WHY", "Config", "attach", "decay_rate", "multipliers", "shared_batch_probe",
           "softmax_weights", "validate"]

validate = Config.validate  # dtrain.config calls it on the algo section

# Keys of other sections that HDET makes meaningless: it is the run's lr schedule (OneCycle's curve,
# shaped by algo.pct_start, algo.div_factor, ...), so the loop's own schedule is never built.
REPLACES = {"optim": ("schedule", "warmup_steps", "min_lr_ratio")}
REPLACES_WHY = "HDET is the run's lr schedule (OneCycle's curve: shape it with algo.pct_start, algo.div_factor, ...)"


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
    """`dtrain train`: max_lr is optim.lr, total_steps the run's steps; the scheduler is the algorithm
    (its state_dict is what the loop checkpoints)."""
    probe = shared_batch_probe(ctx, int(cfg.probe_batches)) if cfg.probe_batches else None
    scheduler = HDET(ctx.optimizer, ctx.lr, total_steps=ctx.total_steps, comm=ctx.comm, cfg=cfg, seed=ctx.seed,
                     probe=probe)
    return Attached(algorithm=scheduler, scheduler=scheduler, scheduler_takes_loss=True)
