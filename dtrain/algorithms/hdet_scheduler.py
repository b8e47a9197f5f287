"""The HDET scheduler: OneCycleLR's arguments and curve, plus fan-out, converge and auto-LR.

See `dtrain.algorithms.hdet` for the method and its equations."""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import torch
from torch.optim.lr_scheduler import LRScheduler

from dtrain.algorithms.base import make_config, optimizer_params
from dtrain.algorithms.hdet_config import Config
from dtrain.algorithms.hdet_controller import (MAX_SCALE, decay_rate, evidence_passes,
                                               multiplier_units, multipliers, parse_explore, resolve_select_steps,
                                               deal, round_sign, softmax_weights, weighted_shift)
from dtrain.algorithms.hdet_onecycle import build_phases, curve_point, init_groups, resolve_total_steps
from dtrain.algorithms.hdet_outer import OuterStep
from dtrain.algorithms.hdet_probe import IterateMean
from dtrain.algorithms.hdet_readout import Readout
from dtrain.algorithms.hdet_replicas import average_finite, broadcast_from, optimizer_state, share_scores
from dtrain.algorithms.hdet_select import Selection
from dtrain.comm.base import Comm


class HDET(Selection, Readout, LRScheduler):
    """OneCycleLR with hyperparameter-divergent replicas, periodic averaging and an auto-LR controller.

    ``HDET(optimizer, max_lr, total_steps, ..., comm=None, cfg=None, seed=0, probe=None, **overrides)``:
    OneCycleLR's arguments (positional as in torch; one left out, or None, takes ``cfg``'s value, whose
    defaults are torch's), then the options of `Config` as ``cfg`` (or dtrain's ``algo`` section) and/or
    keywords (an unknown one is a TypeError). ``comm=None`` is one replica: exactly OneCycleLR. ``seed``
    (the run's, shared by every replica) deals the multipliers; ``probe(converge_index) -> loss`` scores
    this replica on batches every replica shares (see `dtrain.algorithms.hdet_probe`).

    ``step(loss)`` feeds the controller (the loss of the batch just trained on); ``step()`` works too.
    Every replica must call ``step`` the same number of times: converge steps are collectives.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        max_lr: float | list[float],
        total_steps: int | None = None,
        epochs: int | None = None,
        steps_per_epoch: int | None = None,
        pct_start: float | None = None,
        anneal_strategy: str | None = None,
        cycle_momentum: bool | None = None,
        base_momentum: float | list[float] | None = None,
        max_momentum: float | list[float] | None = None,
        div_factor: float | None = None,
        final_div_factor: float | None = None,
        three_phase: bool | None = None,
        last_epoch: int = -1,
        *,
        comm: Comm | None = None,
        cfg: Config | Mapping[str, Any] | None = None,
        seed: int = 0,
        probe: Callable[[int], float] | None = None,
        **overrides: Any,
    ) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"{type(optimizer).__name__} is not an Optimizer")
        onecycle = dict(pct_start=pct_start, anneal_strategy=anneal_strategy, cycle_momentum=cycle_momentum,
                        base_momentum=base_momentum, max_momentum=max_momentum, div_factor=div_factor,
                        final_div_factor=final_div_factor, three_phase=three_phase)
        self.cfg = c = make_config(Config, cfg, {**overrides, **{k: v for k, v in onecycle.items() if v is not None}},
                                   owner="HDET")
        self.optimizer = optimizer
        self.total_steps = resolve_total_steps(total_steps, epochs, steps_per_epoch)
        self._phases = build_phases(self.total_steps, c.pct_start, c.three_phase)
        self._anneal = c.anneal_strategy
        self.cycle_momentum = c.cycle_momentum
        self.knobs = parse_explore(list(c.explore), optimizer, cycle_momentum=c.cycle_momentum)
        self.comm = comm
        self.replicas, self.rank = (comm.world_size, comm.rank) if comm is not None else (1, 0)
        self.spread, self.converge_every = float(c.spread), int(c.converge_every)
        self.mode, self.spacing = c.auto_lr_mode, c.spacing
        self._scaled = self.mode in ("scale", "select")  # c × the curve (else additive: a base lr of its own)
        # With one replica there is nothing to compare (nor with no spread, outside a selection start):
        # the controller stays off and the curve is exactly OneCycle's.
        self.auto_lr = c.auto_lr and self.replicas > 1 and (self.spread > 0 or self.mode == "select" or bool(c.select_steps))
        composed = c.outer != "none"
        if composed and comm is None:
            raise ValueError(f"algo.outer={c.outer} runs over a comm: pass comm= (or outer='none')")
        self.select_steps = resolve_select_steps(c.select_steps, mode=self.mode, total=self.total_steps,
                                                 rounds=int(c.select_rounds), align=self.converge_every if composed else 1)
        if self.select_steps and not self.auto_lr:
            raise ValueError(f"algo.select_steps={self.select_steps} (auto_lr_mode={self.mode}) needs 2+ replicas to "
                             "select from: pass a comm with world_size > 1, or use auto_lr_mode='scale'")
        self.auto_lr_warmup = int(0.1 * self.total_steps) if c.auto_lr_warmup is None else int(c.auto_lr_warmup)
        self.beta, self.sigma, self.gain = float(c.auto_lr_beta), float(c.auto_lr_sigma), float(c.auto_lr_gain)
        self.alpha = c.auto_lr_alpha
        self.window = self.converge_every if c.auto_lr_window is None else int(c.auto_lr_window)
        stop = self.select_steps if c.auto_lr_stop is None and self.mode == "select" else c.auto_lr_stop
        self.auto_lr_stop = None if stop is None else int(stop)
        self.per_group, self.reshuffle = c.per_group, c.reshuffle
        self.average_optimizer_state = c.average_optimizer_state
        self.seed = int(seed)
        if probe is not None and not callable(probe):
            raise TypeError(f"probe must be a callable probe(converge_index) -> loss, got {type(probe).__name__}")
        if c.probe_batches and probe is None:
            raise ValueError(f"algo.probe_batches={c.probe_batches} is how `dtrain train` builds a probe; "
                             "in your own loop pass probe=fn(converge_index) -> loss instead")
        self.probe = probe
        self._iterates = IterateMean()  # the probe's point; empty unless probing
        self._outer: OuterStep | None = None
        self._init_selection(range_=float(c.select_range), grid=c.select_grid, rounds=int(c.select_rounds))
        self.rho = multipliers(self.replicas, self.spread, spacing=self.spacing)
        self._units = multiplier_units(self.replicas)

        groups = optimizer.param_groups
        if c.cycle_momentum:
            if "momentum" not in optimizer.defaults and "betas" not in optimizer.defaults:
                raise ValueError("optimizer must support momentum or beta1 with `cycle_momentum` option enabled "
                                 "(set cycle_momentum=False)")
            self.use_beta1 = "betas" in optimizer.defaults
        init_groups(groups, max_lr, div_factor=c.div_factor, final_div_factor=c.final_div_factor,
                    cycle_momentum=c.cycle_momentum, base_momentum=c.base_momentum, max_momentum=c.max_momentum,
                    use_beta1=getattr(self, "use_beta1", False), fresh=last_epoch == -1)

        # Controller state, one entry per (explored key, param group); values on the explore scale.
        n_knobs, n_groups = len(self.knobs), len(groups)
        self._raw = [[k.read(g) if k.key != "lr" else 0.0 for g in groups] for k in self.knobs]
        self._start = [[k.to_scale(v) for v in row] for k, row in zip(self.knobs, self._raw)]
        self._base: list[list[float | None]] = [[None] * n_groups for _ in range(n_knobs)]
        self._velocity = [[0.0] * n_groups for _ in range(n_knobs)]
        self._gamma = [[0.0] * n_groups for _ in range(n_knobs)]
        self._log_scale = [[0.0] * n_groups for _ in range(n_knobs)]  # scale/select modes: ln c
        self._signs = [[[0, 0] for _ in range(n_groups)] for _ in range(n_knobs)]  # the test's rounds: [up, down]
        self.converges = 0
        self._loss_sum, self._loss_count = 0.0, 0
        self.log: list[dict[str, Any]] = []  # one entry per converge step after the warm-up
        self._perms = self._draw_permutations(0)

        self._grad_sync = None
        self._wants_grad_sync = c.grad_sync and self.replicas > 1
        if self._wants_grad_sync and not self.select_steps:  # with a selection start: from the selection on
            self._start_grad_sync()
        if c.broadcast_init and self.replicas > 1 and last_epoch == -1:
            with torch.no_grad():
                broadcast_from(self.comm, optimizer_params(optimizer), src=0)  # type: ignore[arg-type]
        self._pending_probe: float | None = None
        self._own_hooks = []
        if composed:  # converge = the outer algorithm's step; HDET scores the replicas just before it
            self._outer = OuterStep(c.outer, dict(c.outer_options), optimizer=optimizer, comm=comm,  # type: ignore[arg-type]
                                    seed=self.seed, every=self.converge_every, total_steps=self.total_steps,
                                    lr=float(optimizer.param_groups[0].get("max_lr", optimizer.param_groups[0]["lr"])))
            # registered before the outer algorithm's hooks, so it runs first at every step
            self._own_hooks.append(optimizer.register_step_post_hook(lambda *_: self._before_outer()))
            if not self.select_steps:
                self._outer.build(0)
            elif last_epoch == -1:
                self._outer.solo_round(0)
        self._ready = False  # LRScheduler's own first step (and a resumed last_epoch) must not converge
        super().__init__(optimizer, last_epoch)
        self._ready = True

    # -- the schedule ----------------------------------------------------------------------------
    def step(self, loss: float | torch.Tensor | None = None) -> None:  # type: ignore[override]
        """Advance one optimizer step; ``loss`` (optional) is the loss of the step just taken."""
        if self._ready:
            self._account(loss)
        super().step()

    def _account(self, loss: float | torch.Tensor | None) -> None:
        """Count the loss; keep the probe's running mean; at a converge (or the selection) step, act."""
        if loss is not None:
            value = float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)
            # Only the interval's last `window` steps count: right after an average the replicas agree.
            in_window = self.last_epoch % self.converge_every >= self.converge_every - self.window
            if math.isfinite(value) and in_window:
                self._loss_sum += value
                self._loss_count += 1
        if self.last_epoch >= 0 and self._outer is None:
            self._add_iterate()
        if self._round_ends(self.last_epoch + 1):
            self.select()
        elif self.last_epoch >= 0 and (self.last_epoch + 1) % self.converge_every == 0:
            self.converge()

    def _add_iterate(self) -> None:
        upcoming = -(-(self.last_epoch + 1) // self.converge_every) * self.converge_every
        if self._probes_at(upcoming):
            self._iterates.add(optimizer_params(self.optimizer))

    def _before_outer(self) -> None:
        """Over an outer algorithm: after each inner step and before the outer step, keep the probe's
        running mean and, at a converge step, score this replica's own parameters (the outer step then
        replaces them)."""
        if not self._ready or self.last_epoch < 0:
            return
        self._add_iterate()
        done = self.last_epoch + 1
        if done % self.converge_every == 0 and self._probes_at(done):
            self._pending_probe = self._iterates.score(optimizer_params(self.optimizer), self.probe, self.converges)  # type: ignore[arg-type]

    def get_lr(self) -> list[float]:
        step = self.last_epoch
        if step > self.total_steps:
            raise ValueError(f"Tried to step {step} times. The specified number of total steps is {self.total_steps}")
        lrs = []
        for gi, group in enumerate(self.optimizer.param_groups):
            lr, mom = curve_point(step, self._phases, self._anneal, group, momentum=self.cycle_momentum)
            if self.cycle_momentum:
                if self.use_beta1:
                    group["betas"] = (mom, *group["betas"][1:])
                else:
                    group["momentum"] = mom
            for ki, knob in enumerate(self.knobs):
                if knob.key == "lr":
                    lr = self._explored(ki, gi, lr)
                else:
                    knob.write(group, self._explored(ki, gi, knob.read(group)))
            lrs.append(lr)
        return lrs

    def _explored(self, ki: int, gi: int, schedule_value: float) -> float:
        """This replica's value: (controller base, or the schedule's / initial value) × its multiplier.

        auto_lr_mode=scale: (the schedule's / initial value) × c × its multiplier, the curve kept."""
        knob, base = self.knobs[ki], self._base[ki][gi]
        rho = self.multiplier(knob.name, gi)
        if self._scaled:
            factor = math.exp(self._log_scale[ki][gi]) * rho
            if factor == 1.0:
                return schedule_value if knob.key == "lr" else self._raw[ki][gi]
            if knob.key == "lr":
                return schedule_value * factor
            lo, hi = knob.bounds(self.optimizer.param_groups[gi])
            return knob.from_scale(min(max(self._start[ki][gi] * factor, lo), hi))
        if base is None:
            if rho == 1.0:
                return schedule_value if knob.key == "lr" else self._raw[ki][gi]
            base = schedule_value if knob.key == "lr" else self._start[ki][gi]
        return knob.from_scale(base * rho)

    # -- converge ------------------------------------------------------------------------------
    @torch.no_grad()
    def converge(self) -> None:
        """Average the replicas; after the warm-up, update the controller; re-deal the multipliers.

        During a selection start there is nothing to average: replicas run apart until ``select``."""
        done = self.last_epoch + 1
        if done < self.select_steps:
            self._loss_sum, self._loss_count = 0.0, 0
            return
        probed, self._pending_probe = self._pending_probe, None  # over an outer algorithm: scored before its step
        if self._outer is None and self._probes_at(done):  # before averaging: each replica's own parameters
            probed = self._iterates.score(optimizer_params(self.optimizer), self.probe, self.converges)  # type: ignore[arg-type]
        self._iterates.reset()
        if self.replicas > 1 and self._outer is None:
            average_finite(self.comm, optimizer_params(self.optimizer))
            if self.average_optimizer_state:
                average_finite(self.comm, optimizer_state(self.optimizer))
        if self.auto_lr and done >= self.auto_lr_warmup:
            self._update_controller(self._share_losses(probed), done)
        self._loss_sum, self._loss_count = 0.0, 0
        self.converges += 1
        self._perms = self._draw_permutations(self.converges)

    def _start_grad_sync(self) -> None:
        if self._grad_sync is None:
            from dtrain.algorithms.ddp import DDP

            self._grad_sync = DDP(self.optimizer, self.comm, broadcast_init=False)

    def steering(self, done: int) -> bool:
        """Whether the converge step after ``done`` optimizer steps may still move the controller."""
        return self.auto_lr_stop is None or done <= self.auto_lr_stop

    def _probes_at(self, done: int) -> bool:
        """Whether the converge step after ``done`` optimizer steps scores the replicas with the probe."""
        return (self.probe is not None and self.auto_lr and done >= self.auto_lr_warmup and done > self.select_steps
                and self.steering(done))

    def _share_losses(self, probed: float | None = None) -> list[float | None]:
        """Every replica's loss (the probe's, else its mean over the interval; None: none finite), one all-reduce."""
        mine = probed if self.probe is not None else (self._loss_sum / self._loss_count if self._loss_count else None)
        return share_scores(self.comm, mine)

    def _update_controller(self, losses: list[float | None], done: int) -> None:
        weights = softmax_weights(losses, self.sigma)
        steering = self.steering(done)  # afterwards: no loss-driven moves
        random_deal = self.reshuffle and self.converges > 0  # the first deal is the identity: no test round
        passed_any = []
        for ki, knob in enumerate(self.knobs):
            for gi, group in enumerate(self.optimizer.param_groups):
                perm = self._perms[self._perm_key(ki, gi)]
                if steering and random_deal:
                    sign = round_sign(losses, [self._units[perm[r]] for r in range(self.replicas)])
                    self._signs[ki][gi][0 if sign > 0 else 1] += sign != 0
                # No move (and no take-over from the curve) until the rounds pass the test.
                moves = steering and evidence_passes(*self._signs[ki][gi], self.alpha)
                passed_any.append(moves)
                if self._scaled:  # ln c moves towards the winners' ln ρ; the curve does the decay
                    delta = weighted_shift(weights, [math.log(self.rho[perm[r]]) for r in range(self.replicas)])
                    v = self.beta * self._velocity[ki][gi] + (1 - self.beta) * delta if moves else 0.0
                    self._velocity[ki][gi] = v
                    bound = math.log(MAX_SCALE)
                    self._log_scale[ki][gi] = min(max(self._log_scale[ki][gi] + self.gain * v, -bound), bound)
                    continue
                if self._base[ki][gi] is None:  # the controller takes over from the schedule here
                    if not evidence_passes(*self._signs[ki][gi], self.alpha):
                        continue
                    if knob.key == "lr":
                        start = curve_point(min(done, self.total_steps), self._phases, self._anneal, group, momentum=False)[0]
                        self._gamma[ki][gi] = decay_rate(start, group["min_lr"], (self.total_steps - done) / self.converge_every)
                    else:
                        start = self._start[ki][gi]
                    self._base[ki][gi] = start
                base = float(self._base[ki][gi])  # type: ignore[arg-type]
                delta = weighted_shift(weights, [base * self.rho[perm[r]] for r in range(self.replicas)])
                v = self.beta * self._velocity[ki][gi] + (1 - self.beta) * delta if moves else 0.0
                new = base * (1 - self._gamma[ki][gi]) + self.gain * v
                lo, hi = knob.bounds(group)
                self._velocity[ki][gi] = v
                self._base[ki][gi] = min(max(new, lo), hi) if math.isfinite(new) else base
        self.log.append({"step": done, "losses": losses, "weights": weights, "moved": any(passed_any),
                         **self.snapshot()})

    # -- multipliers ---------------------------------------------------------------------------
    def _perm_key(self, ki: int, gi: int) -> tuple[int, int]:
        return (ki, gi if self.per_group else 0)

    def _draw_permutations(self, converge_index: int) -> dict[tuple[int, int], list[int]]:
        n_groups = len(self.optimizer.param_groups) if self.per_group else 1
        keys = [(ki, gi) for ki in range(len(self.knobs)) for gi in range(n_groups)]
        return deal(keys, self.replicas, seed=self.seed, index=converge_index if self.reshuffle else 0)

    def multiplier(self, name: str = "lr", group: int = 0) -> float:
        """This replica's current multiplier of explored hyperparameter ``name`` in ``group``."""
        if self.selecting:
            return self._selection_factor()
        if self.exploring_stopped:
            return 1.0
        ki = self._knob(name)
        return self.rho[self._perms[self._perm_key(ki, group)][self.rank]]

    @property
    def exploring_stopped(self) -> bool:
        """From step auto_lr_stop on the loss no longer steers, so every replica runs ρ = 1 (fan-in)."""
        return self.auto_lr and self.auto_lr_stop is not None and self.last_epoch >= self.auto_lr_stop

    # -- checkpoints ------------------------------------------------------------------------------
    _STATE = ("last_epoch", "_step_count", "_last_lr", "base_lrs", "total_steps", "converges", "_base",
              "_velocity", "_gamma", "_log_scale", "_signs", "_start", "_raw", "_loss_sum", "_loss_count", "log",
              "replicas", "spread", "spacing", "seed")

    def state_dict(self) -> dict[str, Any]:
        """Everything a resume needs, the probe's running mean of the interval included (exact mid-interval)."""
        grad_sync = self._grad_sync.state_dict() if self._grad_sync is not None else None
        outer = self._outer.state_dict() if self._outer is not None else None
        return {**{key: _plain(getattr(self, key)) for key in self._STATE}, "iterates": self._iterates.state_dict(),
                "grad_sync": grad_sync, "outer": outer}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if int(state_dict["replicas"]) != self.replicas:
            raise ValueError(f"HDET checkpoint was written by {state_dict['replicas']} replicas, this run has {self.replicas}; resume with the same number of workers")
        missing = [key for key in (*self._STATE, "iterates") if key not in state_dict]
        if missing:
            raise ValueError(f"HDET checkpoint has no {missing[0]!r} (written by an older dtrain); resume with the "
                             "version that wrote it, or start the run over")
        for key in self._STATE:
            setattr(self, key, _plain(state_dict[key]))
        self._iterates.load_state_dict(state_dict["iterates"])
        self.rho = multipliers(self.replicas, self.spread, spacing=self.spacing)
        self._perms = self._draw_permutations(self.converges)
        if self._wants_grad_sync and not self.selecting:
            self._start_grad_sync()
            if state_dict.get("grad_sync") is not None:
                self._grad_sync.load_state_dict(state_dict["grad_sync"])  # type: ignore[union-attr]
        if self._outer is not None:
            if state_dict.get("outer") is None and not self.selecting:
                raise ValueError("HDET checkpoint has no outer algorithm state, this run has algo.outer="
                                 f"{self._outer.name}; resume with the config that wrote it")
            self._outer.load_state_dict(state_dict.get("outer"), round_start=self._round_start())

    def remove(self) -> None:
        """Detach from the optimizer: the per-step gradient sync or the outer algorithm (if any), and our hook."""
        if self._grad_sync is not None:
            self._grad_sync.remove()
        if self._outer is not None:
            self._outer.remove()
        for h in self._own_hooks:
            h.remove()
        self._own_hooks = []


def _plain(value: Any) -> Any:
    """Copies of lists/dicts so a saved state never aliases the live one."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
