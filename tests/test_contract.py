"""The shared contract: the optimizer section passed whole, keys that would be ignored refused,
registries by function, positional lr everywhere, counters that add."""

from __future__ import annotations

import inspect

import pytest
import torch

import optimizers
from dtrain import config
from dtrain.comm.base import CommStats
from dtrain.config import ConfigError
from dtrain.optim import build_optimizer


def _model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 1))


def _opt(*overrides: str) -> torch.optim.Optimizer:
    return build_optimizer(config.load(None, list(overrides)).optim, _model())


def test_betas_eps_and_kwargs_reach_a_learning_rate_free_optimizer():
    opt = _opt("optim.name=prodigy", "optim.betas=[0.8,0.99]", "optim.eps=1e-6", "optim.kwargs.d_coef=2.5",
               "optim.kwargs.safeguard_warmup=true")
    group = opt.param_groups[0]
    assert group["betas"] == (0.8, 0.99) and group["eps"] == 1e-6 and group["d_coef"] == 2.5
    assert group["safeguard_warmup"] is True


def test_torch_optimizers_keep_dtrains_points_and_take_any_constructor_argument():
    adamw = _opt("optim.name=adamw")
    assert adamw.param_groups[0]["betas"] == (0.9, 0.95) and adamw.param_groups[0]["lr"] == 3e-3
    sgd = _opt("optim.name=sgd", "optim.kwargs.nesterov=true", "optim.momentum=0.5")
    assert sgd.param_groups[0]["nesterov"] is True and sgd.param_groups[0]["momentum"] == 0.5


@pytest.mark.parametrize("override, name", [
    ("optim.momentum=0.5", "prodigy"), ("optim.betas=[0.9,0.99]", "sgd"), ("optim.kwargs.bogus=1", "adamw"),
    ("optim.momentum=0.9", "adamw"), ("optim.eps=1e-6", "schedulefree_sgd"),
])
def test_a_key_the_optimizer_would_ignore_is_refused_in_one_line(override, name):
    with pytest.raises(ConfigError) as e:
        config.load(None, [f"optim.name={name}", override])
    assert f"does not reach {name}" in str(e.value) and "\n" not in str(e.value)


def test_weight_decay_is_not_smuggled_through_kwargs():
    with pytest.raises(ConfigError, match="set optim.weight_decay itself"):
        config.load(None, ["optim.kwargs.weight_decay=0.5"])


def test_every_optimizer_takes_lr_positionally():
    model = _model()
    for name, cls in optimizers._CLASSES.items():
        params = list(inspect.signature(cls.__init__).parameters.values())
        assert params[2].name == "lr" and params[2].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD, name
        opt = cls(model.parameters(), 0.125)  # Mechanic: the lr of the AdamW it wraps
        assert opt.param_groups[0]["lr"] == 0.125, name


def test_registries_are_extended_by_function_and_refuse_a_clash():
    config.register_workload("toy", "toy_workload")
    config.register_workload("toy", "toy_workload")  # the same again is fine
    with pytest.raises(ValueError, match="already registered"):
        config.register_workload("toy", "another_module")
    assert config.load(None, ["workload.name=toy"]).workload.name == "toy"


def test_comm_stats_add_and_subtract():
    a = CommStats(bytes_sent=5, bytes_recv=1, messages=2, collectives=1, blocked_s=0.5)
    b = CommStats(bytes_sent=7, payload_bytes=3, collectives=2, blocked_s=0.25)
    assert (a + b).as_dict() == {"bytes_sent": 12, "bytes_recv": 1, "payload_bytes": 3, "messages": 2, "collectives": 3,
                                 "blocked_s": 0.75}
    assert (a + b) - b == a
