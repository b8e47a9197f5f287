"""Run-level options of `dtrain train` (issue 17): the user's own model through a factory."""

from __future__ import annotations

import pytest

from dtrain.config import ConfigError, load
from dtrain.train import run

LOCAL = ["comm.name=local", "ckpt_every=0", "progress=false", "plot=false", "threads=1"]


def test_own_model_from_a_factory_trains(tmp_path):
    cfg = load(None, ["workload.name=my_models:make", "workload.hidden=8", "algo.name=ddp", "comm.workers=2",
                      "steps=20", "eval_every=20", "optim.lr=0.03", f"out_dir={tmp_path}", *LOCAL])
    summary = run(cfg)
    assert summary["workload"] == "my_regression" and summary["world_size"] == 2
    assert summary["eval"]["value"] < 0.6 * summary["eval"]["initial"]
    assert (tmp_path / "config.yaml").read_text().count("hidden: 8") == 1


@pytest.mark.parametrize("name, message", [
    ("no_such_module:make", "workload.name=no_such_module:make: no module no_such_module on the Python path"),
    ("my_models:nope", "workload.name=my_models:nope: my_models has no nope"),
    ("my_models", "workload.name='my_models' is not known"),
])
def test_a_factory_that_cannot_be_found_is_one_line(name, message):
    with pytest.raises(ConfigError) as e:
        load(None, [f"workload.name={name}"])
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_factory_keys_are_its_parameters(tmp_path):
    with pytest.raises(ConfigError, match="workload.depth"):  # not a parameter of make(): refused like any unknown key
        load(None, ["workload.name=my_models:make", "workload.depth=2"])
    with pytest.raises(ConfigError, match="workload.hidden"):  # an int parameter takes no text
        load(None, ["workload.name=my_models:make", "workload.hidden=wide"])
    cfg = load(None, ["workload.name=my_models:not_a_workload", "algo.name=none", "comm.workers=1", "steps=1",
                      f"out_dir={tmp_path}", *LOCAL])
    with pytest.raises(ValueError, match="returned int, not a dtrain.workloads.base.Workload"):
        run(cfg)
