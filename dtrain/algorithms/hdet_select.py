"""HDET's selection start: replicas train apart at factors c_r of the whole curve, then all take the best.

A base of `dtrain.algorithms.hdet_scheduler.HDET` (it keeps the state this reads and writes). The start
lasts ``select_steps`` (S) steps split into ``select_rounds`` (k) rounds of S/k steps. In round j every
replica runs c·c_r × the curve, c_r from `selection_factors` with range R^(1/2^j) (R =
``select_range``); at the round's end each is scored (the probe at its current parameters, else its
last interval's mean training loss; the scores are one small all-reduce), every replica takes the best
one's parameters and c ← c·c_winner, so the next round's grid is centred on the winner and half as wide
(in log). With ``select_grid="odd"`` ×1 is on every round's grid: a max_lr that is right is kept
unless another factor beats it on the probe.

What the winner hands over: without an outer algorithm, its parameters and whole optimizer state
(read through ``state_dict``, so numbers kept outside the state tensors travel too: Prodigy's d,
Mechanic's tuner). Over an outer algorithm (whose step each replica runs over a group of one while
apart, see `dtrain.algorithms.hdet_outer`), its parameters only, so the run's bytes stay those of the
outer algorithm (the winner's one broadcast takes the place of the outer steps the start skips); each
replica keeps its own optimizer state, unless some replica's state is not finite, in which case (known
to all from one more small all-reduce) the winner's whole state is taken as above.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from dtrain.algorithms.base import optimizer_params
from dtrain.algorithms.hdet_controller import round_range, selection_factors
from dtrain.algorithms.hdet_replicas import broadcast_from, load_optimizer_from, optimizer_state, share_scores


class Selection:
    """The selection start's state and its round ends (see the module docstring)."""

    # set by HDET
    optimizer: Any
    comm: Any
    replicas: int
    rank: int
    last_epoch: int
    select_steps: int
    converges: int
    log: list
    _log_scale: list[list[float]]
    _outer: Any

    def _init_selection(self, *, range_: float, grid: str, rounds: int) -> None:
        if self.select_steps and grid == "odd" and self.replicas < 3:
            raise ValueError(f"algo.select_grid=odd needs 3 or more replicas (×1 and one factor each way), this run has "
                             f"{self.replicas}; use select_grid=even")
        self._select_range, self._select_grid, self._select_rounds = float(range_), grid, int(rounds)
        self._round_len = max(1, self.select_steps // self._select_rounds)
        self._select_rho = self._round_factors(0)

    def _round_factors(self, round_: int) -> list[float]:
        return selection_factors(self.replicas, round_range(self._select_range, round_), grid=self._select_grid)

    def _select_round(self, step: int) -> int:
        return min(step // self._round_len, self._select_rounds - 1)

    @property
    def selecting(self) -> bool:
        """Whether the replicas are still in the selection start (running apart at c·c_r)."""
        return self.last_epoch < self.select_steps

    def _selection_factor(self) -> float:
        return self._round_factors(self._select_round(self.last_epoch))[self.rank]

    def _round_ends(self, done: int) -> bool:
        return bool(self.select_steps) and done <= self.select_steps and done % self._round_len == 0

    @torch.no_grad()
    def select(self) -> None:
        """End of a selection round: every replica takes the best replica's parameters (and state, see the
        module) and factor; after the last round, training goes on together (grad sync or the outer
        algorithm, if asked for, start here)."""
        done = self.last_epoch + 1
        factors = self._round_factors(self._select_round(done - 1))
        params = optimizer_params(self.optimizer)
        probed = self._iterates.score(params, self.probe, self.converges) if self.probe is not None else None  # type: ignore[attr-defined]
        losses = self._share_losses(probed)  # type: ignore[attr-defined]
        scored = [(x, r) for r, x in enumerate(losses) if x is not None]
        winner = min(scored)[1] if scored else 0
        broadcast_from(self.comm, params, src=winner)
        if self._outer is None:
            load_optimizer_from(self.comm, self.optimizer, src=winner)
        else:
            finite = all(bool(torch.isfinite(t).all()) for t in optimizer_state(self.optimizer))
            if any(f is None for f in share_scores(self.comm, 1.0 if finite else None)):
                load_optimizer_from(self.comm, self.optimizer, src=winner)
        shift = math.log(factors[winner])
        self._log_scale = [[x + shift for x in row] for row in self._log_scale]
        self.log.append({"step": done, "losses": losses, "selected": winner, "factors": factors,
                         **self.snapshot()})  # type: ignore[attr-defined]
        self._loss_sum, self._loss_count = 0.0, 0
        self._iterates.reset()  # type: ignore[attr-defined]
        self.converges += 1
        self._perms = self._draw_permutations(self.converges)  # type: ignore[attr-defined]
        if done == self.select_steps:
            self._train_together(done)
        elif self._outer is not None:
            self._outer.solo_round(done)  # the next round's outer step over this replica alone, from the winner

    def _round_start(self) -> int:
        """The step the current selection round started at."""
        return self._select_round(max(self.last_epoch, 0)) * self._round_len

    def _train_together(self, done: int) -> None:
        """The selection is over: grad sync or the outer algorithm (if asked for) starts here."""
        if self._wants_grad_sync:  # type: ignore[attr-defined]
            self._start_grad_sync()  # type: ignore[attr-defined]
        if self._outer is not None:
            self._outer.build(done)
