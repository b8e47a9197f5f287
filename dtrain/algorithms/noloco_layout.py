"""Which parameters NoLoCo's φ and δ cover: `release`/`restore` for LISA's frozen blocks.

A round's φ and Δ messages must cover the same parameters on every member of the group, and φ is
sent ahead of the outer step (``phi_lead_steps``), so the covered set changes only at a round
boundary: right after an outer step, before the next round's φ goes out (or at once while nothing
has happened since the last one: construction, a resume). A released parameter is still averaged
in the round under way, then dropped; a restored one rejoins with φ_i ← θ_i and δ_i = 0, and what it
trains before that boundary is this worker's own, as between any two outer steps.
"""

from __future__ import annotations

import torch

from dtrain.comm.flat import group_by_dtype, split_like


class HeldLayout:
    """Mixin for `NoLoCo` (it owns ``params``, ``dtype_groups``, ``phi``, ``momentum``, ``held``,
    ``_changes`` and ``_settled``, and calls `_apply_changes` after each outer step)."""

    params: list[torch.Tensor]
    dtype_groups: list[list[int]]
    phi: list[torch.Tensor]
    momentum: list[torch.Tensor]
    held: list[bool]
    _changes: dict[int, bool]
    _settled: bool

    def _to_outer(self, t: torch.Tensor) -> torch.Tensor: ...

    def release(self, params: list[torch.Tensor]) -> None:
        """Frozen ``params`` leave φ and δ at the next round boundary (see the module docstring)."""
        self._change(params, held=False)

    def restore(self, params: list[torch.Tensor]) -> None:
        """``params`` rejoin φ and δ at the next round boundary with φ_i ← θ_i, δ_i = 0."""
        self._change(params, held=True)

    def _change(self, params: list[torch.Tensor], *, held: bool) -> None:
        where = {id(p): i for i, p in enumerate(self.params)}
        for p in params:
            i = where[id(p)]
            if self.held[i] == held:
                self._changes.pop(i, None)
            else:
                self._changes[i] = held
        if self._settled and self._changes:
            self._apply_changes()

    def _apply_changes(self) -> None:
        held = list(self.held)
        for i, h in self._changes.items():
            held[i] = h
        self._changes = {}
        self._relayout(held)

    def _relayout(self, held: list[bool]) -> None:
        """φ and δ over the parameters ``held`` marks: a kept one keeps its values, a new one starts at θ, δ = 0."""
        params = self.params
        old: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for idx, phi, mom in zip(self.dtype_groups, self.phi, self.momentum):
            group = [params[i] for i in idx]
            old.update(zip(idx, zip(split_like(phi, group), split_like(mom, group))))
        self.held = list(held)
        kept = [i for i, h in enumerate(held) if h]
        self.dtype_groups = [[kept[k] for k in g] for g in group_by_dtype([params[i] for i in kept])] if kept else []
        self.phi = [torch.cat([old[i][0].reshape(-1) if i in old else self._to_outer(params[i].detach().reshape(-1)) for i in idx])
                    for idx in self.dtype_groups]
        self.momentum = [torch.cat([old[i][1].reshape(-1) if i in old else torch.zeros(params[i].numel(), dtype=params[i].dtype,
                                    device=self.phi[g].device) for i in idx]) for g, idx in enumerate(self.dtype_groups)]
