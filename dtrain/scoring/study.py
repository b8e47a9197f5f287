"""A study config: the scoring rules and layout (ruleset, studies x trials, the benchmark's workloads).

    ruleset: external        # external | self | best_trial (dtrain's old rule: fastest trial overall)
    studies: 3
    trials: 5                # per study (self-tuning: 1)
    workloads: [digits_cnn, ctr, seq_rnn, char_lm]   # the benchmark: rho divides by how many there are
    max_ratio: 4.0

AlgoPerf v0.6 (``ALGOPERF_V06``) is the default of `dtrain score`; ``configs/studies/`` holds it
and smaller layouts for a laptop.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from dtrain.scoring.profiles import MAX_RATIO, RULESETS
from dtrain.scoring.runner import DEFAULT_WORKLOADS

_KEYS = ("ruleset", "studies", "trials", "workloads", "max_ratio")


@dataclass(frozen=True)
class StudyConfig:
    ruleset: str = "external"
    studies: int = 3
    trials: int = 5
    workloads: tuple[str, ...] = DEFAULT_WORKLOADS
    max_ratio: float = MAX_RATIO

    def __post_init__(self) -> None:
        if self.ruleset not in RULESETS:
            raise ValueError(f"study ruleset must be one of {', '.join(RULESETS)}, got {self.ruleset!r}")
        if self.studies < 1 or self.trials < 1:
            raise ValueError(f"studies and trials must be >= 1, got studies={self.studies}, trials={self.trials}")
        if not self.workloads:
            raise ValueError("a study needs at least one workload: set workloads: [...]")
        if len(set(self.workloads)) != len(self.workloads):
            raise ValueError(f"study workloads must be distinct, got {list(self.workloads)}")
        if not self.max_ratio > 1:
            raise ValueError(f"max_ratio must be > 1, got {self.max_ratio}")

    def with_overrides(self, **changes: Any) -> StudyConfig:
        """A copy with the given fields replaced (None leaves a field as it is)."""
        kept = {k: (tuple(v) if k == "workloads" else v) for k, v in changes.items() if v is not None}
        return replace(self, **kept)

    def as_dict(self) -> dict[str, Any]:
        return {k: (list(getattr(self, k)) if k == "workloads" else getattr(self, k)) for k in _KEYS}


ALGOPERF_V06 = StudyConfig()
# Self-tuning: 3 studies of one trial, budget x1.5 (applied when scoring, see profiles.SELF_TUNING_BUDGET).
ALGOPERF_V06_SELF = StudyConfig(ruleset="self", studies=3, trials=1)


def load_study(path: str | Path) -> StudyConfig:
    """A StudyConfig from YAML; unknown keys are an error that names them."""
    from omegaconf import OmegaConf

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"study config {path} does not exist; see configs/studies/ for examples")
    raw = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    if not isinstance(raw, dict):
        raise ValueError(f"study config {path} must be a mapping of {', '.join(_KEYS)}")
    unknown = sorted(set(raw) - set(_KEYS))
    if unknown:
        raise ValueError(f"study config {path}: unknown key {unknown[0]!r}; allowed: {', '.join(_KEYS)}")
    if "workloads" in raw:
        raw["workloads"] = tuple(raw["workloads"])
    return StudyConfig(**raw)
