"""HDET's options: the one place their defaults live and are checked (library and `dtrain train` alike).

`HDET(optimizer, max_lr, total_steps, ..., comm=None, cfg=None, **overrides)` merges ``cfg`` (or these
defaults) with ``overrides`` and OneCycleLR's arguments through `dtrain.algorithms.base.make_config`;
`dtrain train` passes its ``algo`` section as ``cfg``. See `dtrain.algorithms.hdet` for the method.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dtrain.algorithms.hdet_controller import SELECT_GRIDS, check_hdet_args
from dtrain.algorithms.hdet_outer import check_outer

# OneCycleLR's arguments that are options here (max_lr, total_steps, epochs, steps_per_epoch and
# last_epoch are facts of the run: `dtrain train` takes them from optim.lr and steps).
ONECYCLE_OPTIONS = ("pct_start", "anneal_strategy", "cycle_momentum", "base_momentum", "max_momentum", "div_factor",
                    "final_div_factor", "three_phase")


@dataclass
class Config:
    name: str = "hdet"
    # -- OneCycleLR's curve, with torch's defaults ------------------------------------------------
    pct_start: float = 0.3
    anneal_strategy: str = "cos"  # cos | linear
    cycle_momentum: bool = True  # cycles beta1 (Adam-like) or momentum (SGD) between the two below
    base_momentum: float = 0.85
    max_momentum: float = 0.95
    div_factor: float = 25.0
    final_div_factor: float = 1e4
    three_phase: bool = False
    # -- fan-out and converge -----------------------------------------------------------------------
    spread: float = 0.2  # a: multipliers 1 ± a; wider explores more but costs more (README: HDET as a drop-in)
    spacing: str = "linear"  # multipliers 1 ± a (linear) or (1 + a)^±1 (log)
    converge_every: int = 25  # T: parameters averaged every T steps; nothing is sent in between
    explore: list[str] = field(default_factory=lambda: ["lr"])
    per_group: bool = False  # one multiplier per param group (else one for all groups)
    reshuffle: bool = True  # re-deal the multipliers at every converge step (the significance test needs it)
    average_optimizer_state: bool = False
    grad_sync: bool = False  # also all-reduce gradients every step (HDET on top of DDP)
    broadcast_init: bool = True
    # -- auto-LR ----------------------------------------------------------------------------------------
    auto_lr: bool = True
    auto_lr_mode: str = "scale"  # scale: c × the OneCycle curve | select: start apart, take the best | additive
    auto_lr_alpha: float | None = 0.05  # level of the test that must pass before the loss moves the lr (None: no test)
    auto_lr_warmup: int | None = None  # steps; None = 10% of the run
    auto_lr_beta: float = 0.9
    auto_lr_sigma: float = 0.02  # σ in loss units (nats): char_lm replicas differ by a few hundredths
    auto_lr_gain: float = 0.5
    auto_lr_window: int | None = None  # last steps of each interval whose loss counts; None = all T
    auto_lr_stop: int | None = None  # step from which the loss no longer steers; None = never (select: select_steps)
    probe_batches: int = 0  # dtrain train: score replicas on this many shared held-out batches (library: probe=fn)
    select_steps: int | None = None  # replicas start apart until this step; None = 10% of the run in select mode
    select_range: float = 10.0  # how far off max_lr may be, either way, for the selection start
    select_grid: str = "even"  # even: factors range^u, u evenly in [-1, 1] | odd: x1 always among them
    select_rounds: int = 1  # rounds of the selection start; round j's range is select_range^(1/2^j)
    # -- the outer algorithm HDET rides on (composition; see dtrain.algorithms.hdet_outer) ----------
    outer: str = "none"  # none: converge = plain averaging | diloco | noloco: converge = their outer step
    outer_options: dict[str, Any] = field(default_factory=dict)  # the outer algorithm's keys (not sync_every)

    def validate(self) -> None:
        """One-line ValueError naming the key; works on dtrain's ``algo`` section too (attributes only)."""
        try:
            check_hdet_args(self.spread, self.converge_every, self.auto_lr_warmup, self.auto_lr_beta,
                            self.auto_lr_sigma, self.auto_lr_gain, spacing=self.spacing, mode=self.auto_lr_mode,
                            window=self.auto_lr_window, stop=self.auto_lr_stop)
        except ValueError as e:
            raise ValueError(f"algo.{e}") from None
        if not isinstance(self.pct_start, float) or not 0 <= self.pct_start <= 1:
            raise ValueError(f"algo.pct_start must be a float in [0, 1], got {self.pct_start!r}")
        if self.anneal_strategy not in ("cos", "linear"):
            raise ValueError(f"algo.anneal_strategy must be cos or linear, got {self.anneal_strategy!r}")
        if self.div_factor <= 0 or self.final_div_factor <= 0:
            raise ValueError("algo.div_factor and algo.final_div_factor must be > 0")
        if self.auto_lr_alpha is not None and not 0 < self.auto_lr_alpha < 1:
            raise ValueError(f"algo.auto_lr_alpha must be in (0, 1) or null (no test), got {self.auto_lr_alpha}")
        if self.auto_lr_alpha is not None and self.auto_lr and not self.reshuffle and self.auto_lr_mode != "select":
            raise ValueError("algo.reshuffle=false leaves the significance test no random deal to test against: "
                             "set algo.reshuffle=true, or algo.auto_lr_alpha=null to steer without a test")
        _check_selection(self)
        if int(self.probe_batches) != self.probe_batches or self.probe_batches < 0:
            raise ValueError(f"algo.probe_batches must be an integer >= 0 (0 = score replicas by their training losses), got {self.probe_batches}")
        if not self.explore:
            raise ValueError("algo.explore must list at least one param-group key (e.g. [lr])")
        check_outer(self)



def _check_selection(cfg: Config) -> None:
    """The selection start's keys (a module function: validate also runs on dtrain's DictConfig)."""
    steps, mode = cfg.select_steps, cfg.auto_lr_mode
    if steps is not None and (int(steps) != steps or steps < 0):
        raise ValueError(f"algo.select_steps must be an integer >= 0 or null, got {steps}")
    selecting = mode == "select" or bool(steps)
    if mode == "select" and steps == 0:
        raise ValueError("algo.select_steps=0 means no selection start; give it a step (or null: 10% of the run), "
                         "or choose algo.auto_lr_mode=scale")
    if selecting and not cfg.auto_lr:
        raise ValueError("algo.select_steps needs algo.auto_lr=true (the selection start is part of auto-LR); "
                         "remove select_steps or turn auto_lr on")
    if steps and mode not in ("scale", "select"):
        raise ValueError("algo.select_steps needs auto_lr_mode='select' (or 'scale'): the winner's factor c "
                         "scales the schedule")
    if selecting and not cfg.select_range > 1:
        raise ValueError(f"algo.select_range must be > 1 (replicas start at c = range^u, u in [-1, 1]), got {cfg.select_range}")
    if cfg.select_grid not in SELECT_GRIDS:
        raise ValueError(f"algo.select_grid must be one of {', '.join(SELECT_GRIDS)}, got {cfg.select_grid!r}")
    rounds = cfg.select_rounds
    if int(rounds) != rounds or rounds < 1:
        raise ValueError(f"algo.select_rounds must be an integer >= 1, got {rounds}")
    if not selecting and (rounds != 1 or cfg.select_grid != "even"):
        key = "select_rounds" if rounds != 1 else "select_grid"
        raise ValueError(f"algo.{key} shapes the selection start, which is off; set algo.auto_lr_mode=select or remove algo.{key}")

