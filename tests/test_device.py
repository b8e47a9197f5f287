"""The run key ``device: auto | cpu | cuda`` (issue 17 item 3) and the batch mover `dtrain.device.to_device`.

The CUDA paths themselves (the model and batches on a GPU, nccl, bf16 there) run in
benchmarks/gpu_check.sh on a machine with a GPU; here: the config checks, the CPU path, the
helper's structure preservation and checkpoints that carry no device.
"""

from __future__ import annotations

from collections import OrderedDict, namedtuple

import pytest
import torch

from dtrain import checkpoint
from dtrain.config import ConfigError, load
from dtrain.device import comm_backend, resolve, to_device
from dtrain.train import run

LOCAL = ["comm.name=local", "progress=false", "plot=false", "threads=1"]
SMALL = ["workload.name=my_models:make", "workload.hidden=8", "algo.name=diloco", "algo.sync_every=3", "comm.workers=2",
         "optim.lr=0.03", "optim.schedule=constant", "optim.warmup_steps=0", "eval_every=6", *LOCAL]  # lr not tied to steps
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")


def _one_line(overrides: list[str]) -> str:
    with pytest.raises(ConfigError) as e:
        load(None, overrides)
    assert "\n" not in str(e.value)
    return str(e.value)


@no_cuda
def test_cuda_without_cuda_is_one_line():
    msg = _one_line(["device=cuda"])
    assert msg.startswith("device=cuda but CUDA is not available") and "use device=cpu or device=auto" in msg


def test_bad_device_and_nccl_on_cpu_are_one_line():
    assert _one_line(["device=tpu"]) == "device must be auto, cpu or cuda, got 'tpu'"
    assert _one_line(["device=cpu", "comm.backend=nccl"]).startswith("comm.backend=nccl needs device=cuda")


def test_device_defaults_to_auto_and_is_no_trajectory_key():
    from dtrain.run_dir import identity

    a, b = load(None, []), load(None, ["device=cpu"])
    assert a.device == "auto"
    assert identity(a, 2) == identity(b, 2)  # a run moves between devices on resume


def test_resolve_and_backend(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert resolve("cpu") == torch.device("cpu")
    assert resolve("cuda") == torch.device("cuda", 3)  # one GPU per torchrun process
    assert resolve("cuda", local=True) == torch.device("cuda", 0)  # threads of one process share cuda:0
    assert comm_backend("auto", torch.device("cuda", 1)) == "nccl"
    assert comm_backend("auto", torch.device("cpu")) == "gloo"
    assert comm_backend("gloo", torch.device("cuda", 0)) == "gloo"


Pair = namedtuple("Pair", "x y")


def test_to_device_keeps_nested_structure():
    x, y, z = torch.ones(2, 3), torch.zeros(4, dtype=torch.long), torch.full((1,), 2.0, dtype=torch.float64)
    batch = {"inputs": (x, [y, 7, "text"]), "pair": Pair(x, None), "ordered": OrderedDict(z=z), "scalar": 1.5}
    moved = to_device(batch, "meta")
    assert set(moved) == set(batch) and moved["scalar"] == 1.5
    inputs = moved["inputs"]
    assert isinstance(inputs, tuple) and isinstance(inputs[1], list) and inputs[1][1:] == [7, "text"]
    assert inputs[0].device.type == "meta" and inputs[0].shape == x.shape and inputs[0].dtype == x.dtype
    assert inputs[1][0].device.type == "meta" and inputs[1][0].dtype == torch.long
    assert isinstance(moved["pair"], Pair) and moved["pair"].x.device.type == "meta" and moved["pair"].y is None
    assert isinstance(moved["ordered"], OrderedDict) and moved["ordered"]["z"].dtype == torch.float64
    same = to_device((x, {"y": y}), torch.device("cpu"))
    assert same[0] is x and same[1]["y"] is y  # already there: no copy


def _weights(out) -> dict[str, torch.Tensor]:
    step = checkpoint.steps_available(out, 0)[-1]
    return checkpoint.load(out, 0, step)["model"]


@no_cuda
def test_cpu_and_auto_are_bit_identical(tmp_path):
    runs = {}
    for device in ("auto", "cpu"):
        out = tmp_path / device
        summary = run(load(None, [*SMALL, "steps=6", "ckpt_every=6", f"device={device}", f"out_dir={out}"]))
        runs[device] = (summary["final_loss"], summary["eval"]["value"], _weights(out))
    (loss_a, eval_a, w_a), (loss_c, eval_c, w_c) = runs["auto"], runs["cpu"]
    assert loss_a == loss_c and eval_a == eval_c
    assert w_a.keys() == w_c.keys() and all(torch.equal(w_a[k], w_c[k]) for k in w_a)


def test_resume_with_device_cpu_loads_on_the_cpu(tmp_path, monkeypatch):
    full = tmp_path / "full"
    run(load(None, [*SMALL, "steps=6", "ckpt_every=6", f"out_dir={full}"]))
    part = tmp_path / "part"
    run(load(None, [*SMALL, "steps=3", "ckpt_every=3", "device=auto", f"out_dir={part}"]))
    seen: list[object] = []
    real = torch.load

    def spy(*args, **kwargs):
        seen.append(kwargs.get("map_location"))
        return real(*args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "load", spy)
    # another device key than the one that wrote the checkpoint: still the same run
    summary = run(load(None, [*SMALL, "steps=6", "ckpt_every=6", "device=cpu", "resume=true", f"out_dir={part}"]))
    monkeypatch.setattr(checkpoint.torch, "load", real)
    assert summary["resumed_from"] == 3
    assert seen and all(m == "cpu" for m in seen)  # whatever device wrote it, it is read onto the CPU first
    if not torch.cuda.is_available():  # both halves on the CPU: the trajectory continues exactly
        a, b = _weights(full), _weights(part)
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_train_help_lists_the_device_key(capsys):
    from dtrain.cli import main

    assert main(["train", "--help"]) == 0
    assert "device=auto" in capsys.readouterr().out


def test_nccl_with_more_processes_than_gpus_is_one_line(monkeypatch):
    from dtrain.device import check_sharing

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    check_sharing("gloo", torch.device("cuda", 0))  # gloo shares one GPU between processes
    with pytest.raises(ValueError) as e:
        check_sharing("nccl", torch.device("cuda", 0))
    assert "\n" not in str(e.value) and "launch --nproc-per-node 1, or set comm.backend=gloo" in str(e.value)
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve("cuda") == torch.device("cuda", 0)  # round-robin over the GPUs there are


def test_hierarchical_cuda_over_gloo_is_one_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # only the config check runs: no GPU is touched
    msg = _one_line(["device=cuda", "comm.backend=gloo", "comm.inner_size=2", "parallel.inner=ddp"])
    assert msg.startswith("parallel.inner=ddp with device=cuda needs comm.backend=nccl or auto")


def test_the_model_is_moved_before_the_optimizer_and_algorithms_are_built():
    # the 'meta' device stands in for a GPU: nothing is computed, only where each tensor is made
    from dtrain.comm.local import LocalGroup
    from dtrain.train import Parts

    cfg = load(None, [*SMALL, "steps=6", "algo.name=diloco", "comm.workers=1"])
    parts = Parts.build(cfg, LocalGroup(1).comm(0), device=torch.device("meta"))
    params = list(parts.model.parameters())
    assert params and all(p.device.type == "meta" for p in params)
    assert {id(p) for g in parts.optimizer.param_groups for p in g["params"]} == {id(p) for p in params}  # the moved ones
    assert all(phi.device.type == "meta" for phi in parts.algorithm.outer_params)  # outer_device=same follows them
