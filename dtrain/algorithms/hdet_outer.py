"""HDET over an outer algorithm (DiLoCo, NoLoCo): the outer step is HDET's converge.

Plain HDET averages the replicas every T steps, which is DiLoCo with outer lr 1 and no momentum.
With ``outer="diloco"`` (or ``"noloco"``) the replicas are that algorithm's workers: each inner-trains
with its own lr multiplier, and every T = ``converge_every`` steps the outer algorithm's own step
(DiLoCo's Nesterov step on the mean outer gradient, NoLoCo's pair step) replaces the average. HDET
only reads its scores at those boundaries (the probe, before the outer step changes the weights) and
shares them, a few floats per round, on top of the outer algorithm's bytes.

The outer algorithm is built through the shared contract (its module's ``attach``, as `dtrain train`
does) on the same optimizer, with ``sync_every = converge_every`` and ``broadcast_init = False`` (HDET
broadcasts the start itself). It is built when the replicas start training together: at step 0, or,
with a selection start, at its end, from the winner's weights (so its first outer step comes T steps
after the selection, and NoLoCo counts its rounds and run length from there).

During a selection start each replica runs the same outer algorithm over a group of one (`Solo`):
every T steps the outer step on its own pseudo-gradient (DiLoCo's Nesterov, NoLoCo's momentum step),
nothing sent. Why: the outer step changes which inner lr is best (outer momentum amplifies what the
inner steps did, so a max_lr a replica tolerates alone can be far too high under DiLoCo); scored
without it, the selection measured the best lr for training alone, not for the outer algorithm.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch

from dtrain.algorithms.base import AttachContext, make_config
from dtrain.comm.base import Comm, CommError

OUTER = {"diloco": "dtrain.algorithms.diloco", "noloco": "dtrain.algorithms.noloco"}
# Keys of the outer algorithm that HDET sets itself: the period is HDET's converge_every, the start its own.
_SET_BY_HDET = {"sync_every": "algo.converge_every (the outer step is the converge step)",
                "broadcast_init": "algo.broadcast_init (HDET starts every replica from rank 0's weights)"}


def check_outer(cfg: Any) -> None:
    """One-line ValueError naming the key; runs inside `Config.validate` (dataclass or DictConfig)."""
    options = dict(cfg.outer_options or {})
    if cfg.outer == "none":
        if options:
            raise ValueError(f"algo.outer_options.{next(iter(options))} is set but algo.outer=none; "
                             f"name the outer algorithm (algo.outer=diloco or noloco) or remove it")
        return
    if cfg.outer not in OUTER:
        raise ValueError(f"algo.outer must be none or one of {', '.join(OUTER)}, got {cfg.outer!r}")
    for key, where in _SET_BY_HDET.items():
        if key in options:
            raise ValueError(f"algo.outer_options.{key} is set by HDET from {where}; remove it")
    if cfg.grad_sync:
        raise ValueError(f"algo.grad_sync=true syncs every step, which makes algo.outer={cfg.outer} pointless; "
                         "choose one (grad_sync=false, or outer=none)")
    if cfg.average_optimizer_state:
        raise ValueError(f"algo.average_optimizer_state needs plain averaging; with algo.outer={cfg.outer} "
                         "the outer step is the converge step: set it to false")
    module = importlib.import_module(OUTER[cfg.outer])
    try:
        make_config(module.Config, None, {**options, "sync_every": int(cfg.converge_every)}, owner=cfg.outer)
    except TypeError as e:
        raise ValueError(f"algo.outer_options: {e}") from None
    except ValueError as e:  # the outer algorithm's own check names algo.KEY: here it is algo.outer_options.KEY
        raise ValueError(str(e).replace("algo.", "algo.outer_options.")) from None


class Solo(Comm):
    """A group of one: the outer algorithm's own step on this replica's pseudo-gradient, nothing sent."""

    rank, world_size = 0, 1

    def _all_reduce(self, flat: torch.Tensor, op: str) -> Any:
        return lambda _timeout: None

    def _broadcast(self, flat: torch.Tensor, src: int) -> Any:
        return lambda _timeout: None

    def _barrier(self) -> None:
        pass

    def _all_gather_bytes(self, payload: bytes) -> list[bytes]:
        return [bytes(payload)]

    def _exchange(self, flat: torch.Tensor, peer: int, tag: int) -> Any:
        raise CommError(f"a group of one has no peer {peer}")


class OuterStep:
    """The outer algorithm HDET rides on, built once the replicas train together (see the module)."""

    def __init__(self, name: str, options: dict[str, Any], *, optimizer: torch.optim.Optimizer, comm: Comm,
                 seed: int, every: int, total_steps: int, lr: float) -> None:
        self.name, self.every, self.total_steps = name, int(every), int(total_steps)
        self.module = importlib.import_module(OUTER[name])
        self.cfg = make_config(self.module.Config, None, {**options, "sync_every": self.every, "broadcast_init": False},
                               owner=name)
        self.optimizer, self.comm, self.seed, self.lr = optimizer, comm, int(seed), float(lr)
        self.algorithm: Any = None
        self.start = 0
        self.solo: Any = None  # during a selection start: the outer algorithm over this replica alone

    def _attach(self, comm: Comm, start: int) -> Any:
        ctx = AttachContext(model=None, optimizer=self.optimizer, comm=comm, seed=self.seed,  # type: ignore[arg-type]
                            total_steps=self.total_steps - start, lr=self.lr)
        return self.module.attach(self.cfg, ctx).algorithm

    def solo_round(self, start: int) -> None:
        """A selection round starts after ``start`` steps: the outer step over this replica alone, from its
        current weights (a fresh one each round: the weights may have just been replaced by the winner's)."""
        self.end_solo()
        self.solo = self._attach(Solo(), start)

    def end_solo(self) -> None:
        if self.solo is not None:
            self.solo.remove()
            self.solo = None

    def build(self, start: int) -> Any:
        """Hook the outer algorithm on the optimizer now (after ``start`` steps); a no-op once built."""
        if self.algorithm is None:
            self.end_solo()
            self.start = int(start)
            self.algorithm = self._attach(self.comm, self.start)
        return self.algorithm

    def state_dict(self) -> dict[str, Any] | None:
        if self.algorithm is None:
            return None if self.solo is None else {"solo": self.solo.state_dict()}
        return {"start": self.start, "state": self.algorithm.state_dict()}

    def load_state_dict(self, state: dict[str, Any] | None, *, round_start: int = 0) -> None:
        if state is None:
            return
        if "solo" in state:
            self.solo_round(round_start)
            self.solo.load_state_dict(state["solo"])
        else:
            self.build(int(state["start"]))
            self.algorithm.load_state_dict(state["state"])

    def report(self) -> dict[str, Any] | None:
        return None if self.algorithm is None else {"name": self.name, "start": self.start, **self.algorithm.report()}

    @property
    def skipped_steps(self) -> int:
        return 0 if self.algorithm is None else int(self.algorithm.skipped_steps)

    def remove(self) -> None:
        self.end_solo()
        if self.algorithm is not None:
            self.algorithm.remove()
