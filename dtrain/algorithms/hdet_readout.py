"""What HDET shows of itself: the controller's values per param group, the test's evidence, the report.

A base of `dtrain.algorithms.hdet_scheduler.HDET`, reading only the state the scheduler keeps."""

from __future__ import annotations

import math
from typing import Any

from dtrain.algorithms.hdet_controller import bet_wealth
from dtrain.algorithms.hdet_onecycle import curve_point


class Readout:
    """Read-only views of an `HDET` scheduler's state (nothing here changes it)."""

    # set by HDET: explored keys, their controller state per (key, param group), the curve, the log
    knobs: list
    optimizer: Any
    _log_scale: list[list[float]]
    _base: list[list[float | None]]
    _start: list[list[float]]
    _signs: list[list[list[int]]]
    _phases: tuple
    _anneal: str
    _scaled: bool
    _grad_sync: Any
    _outer: Any
    last_epoch: int
    total_steps: int
    converges: int
    rho: list[float]
    log: list[dict[str, Any]]

    def _knob(self, name: str) -> int:
        return next(i for i, k in enumerate(self.knobs) if k.name == name)

    def base_values(self, name: str = "lr") -> list[float | None]:
        """The controller's base value per param group (None before the controller starts).

        auto_lr_mode=scale: the value before the multiplier, i.e. the schedule's (or initial) value × c."""
        ki = self._knob(name)
        knob = self.knobs[ki]
        if self._scaled:
            out = []
            for gi, group in enumerate(self.optimizer.param_groups):
                c = math.exp(self._log_scale[ki][gi])
                if knob.key == "lr":
                    step = min(max(self.last_epoch, 0), self.total_steps)
                    out.append(curve_point(step, self._phases, self._anneal, group, momentum=False)[0] * c)
                else:
                    lo, hi = knob.bounds(group)
                    out.append(knob.from_scale(min(max(self._start[ki][gi] * c, lo), hi)))
            return out
        return [None if b is None else knob.from_scale(b) for b in self._base[ki]]

    def scale_values(self, name: str = "lr") -> list[float]:
        """auto_lr_mode=scale: the controller's factor c per param group on the explored value (1 at start)."""
        ki = self._knob(name)
        return [math.exp(x) for x in self._log_scale[ki]]

    def evidence(self, name: str = "lr") -> list[float]:
        """The test's wealth per param group (it passes at 1/auto_lr_alpha): how sure the rounds are that
        the multiplier changes the loss."""
        ki = self._knob(name)
        return [bet_wealth(*row) for row in self._signs[ki]]

    @property
    def skipped_steps(self) -> int:
        """Updates skipped on every replica together (by the per-step gradient sync or the outer algorithm, if any)."""
        outer = self._outer.skipped_steps if self._outer is not None else 0
        return (self._grad_sync.skipped_steps if self._grad_sync is not None else 0) + outer

    def report(self) -> dict[str, Any]:
        """What `dtrain train` writes into summary.json for this run."""
        has_lr = any(k.name == "lr" for k in self.knobs)
        return {"converges": self.converges, "multipliers": self.rho, "skipped_steps": self.skipped_steps,
                "base_lr": self.base_values("lr") if has_lr else None,
                "lr_scale": self.scale_values("lr") if has_lr and self._scaled else None,
                "evidence": self.evidence("lr") if has_lr else None, "moved": any(e.get("moved") for e in self.log),
                "final_lr": [g["lr"] for g in self.optimizer.param_groups],
                "last_scores": self.log[-1]["losses"] if self.log else None,
                "outer": self._outer.report() if self._outer is not None else None}

    def snapshot(self) -> dict[str, Any]:
        """The controller's values now, as a converge step's log entry records them."""
        return {"base": {k.name: self.base_values(k.name) for k in self.knobs},
                "scale": {k.name: [math.exp(x) for x in row] for k, row in zip(self.knobs, self._log_scale)}}

