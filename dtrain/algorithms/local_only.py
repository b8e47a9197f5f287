"""No synchronisation: each worker trains alone (the single-process baseline, or N independent runs)."""

from __future__ import annotations

from dataclasses import dataclass

from dtrain.algorithms.base import Algorithm


@dataclass
class Config:
    name: str = "none"

    def validate(self) -> None:
        """Nothing to check: the algorithm has no options."""


validate = Config.validate  # dtrain.config calls it on the algo section


class LocalOnly(Algorithm):
    """``LocalOnly(optimizer, comm)``: hooks the optimizer only to count steps; sends nothing."""

    Config = Config


attach = LocalOnly.attach  # what `dtrain train` calls for algo.name=none
