"""Learning-rate-free optimizers: plain torch.optim.Optimizer subclasses, importable without dtrain.

    from optimizers import Prodigy
    opt = Prodigy(model.parameters(), weight_decay=0.01)

or by name, as the training engine does::

    opt = optimizers.create("schedulefree_adamw", model.parameters(), preset="algoperf_schedulefree_adamw")

Constructor defaults are the published ones. ``PRESETS`` holds the public
AlgoPerf-calibrated settings. A preset may carry ``"warmup_fraction"``: the
fraction of the run's steps over which the caller's LR scheduler warms the
learning rate up linearly (then cosine decay for NAdamW, constant for
Schedule-Free). ``create`` does not pass it to the optimizer; read it with
``PRESETS[preset].get("warmup_fraction", 0.0)``.

Optimizers that keep a global scalar (Prodigy, D-Adaptation, DoG/LDoG,
Mechanic) accept ``process_group=`` or ``comm=`` (an object with
``all_reduce(list_of_tensors, op="sum")``) for sharded parameters.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable

import torch

from .averager import PolynomialDecayAverager
from .dadapt_adam import DAdaptAdam
from .dadapt_sgd import DAdaptSGD
from .dog import DoG, LDoG
from .mechanic import Mechanic
from .nadamw import NAdamW
from .prodigy import Prodigy
from .schedulefree_adamw import ScheduleFreeAdamW
from .schedulefree_sgd import ScheduleFreeSGD

__all__ = ["NAdamW", "Prodigy", "DAdaptAdam", "DAdaptSGD", "DoG", "LDoG", "Mechanic", "ScheduleFreeAdamW",
           "ScheduleFreeSGD", "PolynomialDecayAverager", "OPTIMIZERS", "PRESETS", "create"]

_CLASSES: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "nadamw": NAdamW,
    "prodigy": Prodigy,
    "dadapt_adam": DAdaptAdam,
    "dadapt_sgd": DAdaptSGD,
    "dog": DoG,
    "ldog": LDoG,
    "mechanic": Mechanic,  # wraps torch.optim.AdamW unless base= is given
    "schedulefree_adamw": ScheduleFreeAdamW,
    "schedulefree_sgd": ScheduleFreeSGD,
}

OPTIMIZERS: tuple[str, ...] = tuple(_CLASSES)

# AlgoPerf self-tuning settings (public leaderboard submissions).
PRESETS: dict[str, dict[str, Any]] = {
    # NAdamW baseline, self-tuning point: warm-up 2% of the steps, then cosine decay.
    "algoperf_nadamw": dict(lr=0.0017486387539278373, betas=(1.0 - 0.06733926164, 0.9955159689799007),
                            eps=1e-8, weight_decay=0.08121616522670176, warmup_fraction=0.02),
    # Schedule-Free AdamW self-tuning submission: warm-up 2%, no decay.
    "algoperf_schedulefree_adamw": dict(lr=0.0025, betas=(0.9, 0.9955159689799007), eps=1e-8,
                                        weight_decay=0.08121616522670176, r=0.75, weight_lr_power=2.0,
                                        warmup_fraction=0.02),
}

_PRESET_FOR = {"algoperf_nadamw": "nadamw", "algoperf_schedulefree_adamw": "schedulefree_adamw"}

_CALLER_KEYS = ("warmup_fraction",)  # read by the caller's scheduler, not by the optimizer


def create(name: str, params: Any, *, preset: str = "", **hyper: Any) -> torch.optim.Optimizer:
    """Build optimizer ``name`` on ``params``: published defaults, then ``preset``, then ``hyper``."""
    if name not in _CLASSES:
        raise ValueError(f"unknown optimizer {name!r}; choose one of: {', '.join(OPTIMIZERS)}")
    settings: dict[str, Any] = {}
    if preset:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)} (or '' for defaults)")
        if _PRESET_FOR[preset] != name:
            raise ValueError(f"preset {preset!r} is for optimizer {_PRESET_FOR[preset]!r}, not {name!r}; "
                             f"choose one of: {', '.join(p for p, o in _PRESET_FOR.items() if o == name) or 'none'}")
        settings.update(PRESETS[preset])
    settings.update(hyper)
    for key in _CALLER_KEYS:
        settings.pop(key, None)
    cls = _CLASSES[name]
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "params")]
    unknown = sorted(set(settings) - set(accepted))
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown hyperparameter {unknown[0]!r}; choose from: {', '.join(accepted)}")
    return cls(params, **settings)
