"""What a run carries across a checkpoint besides model, optimizer, schedule and algorithm."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from dtrain.comm.base import CommStats


@dataclass
class RunState:
    """Clocks and counters of one worker's run; ``state_dict`` goes into every checkpoint.

    ``comm`` is this worker's traffic up to the checkpoint it resumed from (zero for a fresh run),
    so the counters in summary.json cover the whole run, not only the last attempt.
    """

    train_time_s: float = 0.0  # training steps only (evaluation and checkpoints excluded)
    wall_s: float = 0.0
    time_to_target_s: float | None = None
    nonfinite_steps: int = 0
    initial_eval: float | None = None
    comm: CommStats = field(default_factory=CommStats)
    comm_inner: CommStats = field(default_factory=CommStats)  # inside a hierarchical worker (fast links)

    def state_dict(self) -> dict[str, Any]:
        return {**asdict(self), "comm": self.comm.as_dict(), "comm_inner": self.comm_inner.as_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for f in fields(self):
            if f.name in ("comm", "comm_inner"):
                setattr(self, f.name, CommStats(**state.get(f.name, {})))
            elif f.name in state:
                setattr(self, f.name, state[f.name])
