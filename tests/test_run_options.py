"""Run-level options of `dtrain train` (issue 17): the user's own model, precision, grad_accum."""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import pytest
import torch

from dtrain.algorithms.base import AttachContext, Attached
from dtrain.algorithms.ddp import DDP
from dtrain.comm.local import run_local
from dtrain.config import ConfigError, load
from dtrain.step import Stepper
from dtrain.train import run
from dtrain.workloads.base import Workload, generator

LOCAL = ["comm.name=local", "ckpt_every=0", "progress=false", "plot=false", "threads=1"]


def test_own_model_from_a_factory_trains(tmp_path):
    cfg = load(None, ["workload.name=my_models:make", "workload.hidden=8", "algo.name=ddp", "comm.workers=2",
                      "steps=20", "eval_every=20", "optim.lr=0.03", f"out_dir={tmp_path}", *LOCAL])
    summary = run(cfg)
    assert summary["workload"] == "my_regression" and summary["world_size"] == 2
    assert summary["eval"]["value"] < 0.6 * summary["eval"]["initial"]
    assert (tmp_path / "config.yaml").read_text().count("hidden: 8") == 1


def test_the_readme_factory_example_trains(tmp_path, monkeypatch):
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("### Your own model"):]
    (tmp_path / "readme_models.py").write_text(re.search(r"```python\n(.*?)```", section, flags=re.S).group(1))
    command = re.search(r"```bash\n(.*?)```", section, flags=re.S).group(1)
    keys = [k for k in command.split() if k.startswith("workload.")]
    assert keys == ["workload.name=my_models:make", "workload.hidden=64"]
    monkeypatch.syspath_prepend(str(tmp_path))
    summary = run(load(None, ["workload.name=readme_models:make", keys[1], "algo.name=none", "comm.workers=1", "steps=15",
                              "eval_every=15", "optim.lr=0.01", f"out_dir={tmp_path / 'run'}", *LOCAL]))
    assert summary["workload"] == "my_regression" and summary["eval"]["value"] < 0.7 * summary["eval"]["initial"]


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


TINY_LM = ["workload.n_layer=1", "workload.d_model=32", "workload.n_head=2", "workload.seq_len=32", "workload.batch_size=8",
           "workload.eval_batches=1", "workload.eval_batch_size=8"]


def _lm(tmp_path, name, *extra):
    return run(load(None, [*TINY_LM, "steps=6", "eval_every=6", "optim.warmup_steps=0", f"out_dir={tmp_path / name}",
                           *LOCAL, *extra]))


def test_bf16_trains_close_to_but_not_exactly_fp32(tmp_path):
    fp32 = _lm(tmp_path, "fp32", "algo.name=none", "comm.workers=1")
    bf16 = _lm(tmp_path, "bf16", "algo.name=none", "comm.workers=1", "precision=bf16")
    assert bf16["eval"]["value"] < bf16["eval"]["initial"] - 0.2  # it trains
    assert bf16["final_loss"] != fp32["final_loss"]  # the forward really ran in bf16
    assert abs(bf16["final_loss"] - fp32["final_loss"]) < 0.02 * fp32["final_loss"]
    assert bf16["eval"]["initial"] == fp32["eval"]["initial"]  # evaluation stays fp32


@pytest.mark.parametrize("override, message", [
    ("precision=fp8", "precision must be fp32, bf16 or fp16, got 'fp8'"),
    ("grad_accum=0", "grad_accum must be >= 1, got 0"),
    ("grad_accum=3", "grad_accum=3 must divide workload.batch_size=16"),
    ("algo.name=spsa grad_accum=2", "grad_accum is ignored under algo.name=spsa"),
    ("comm.inner_size=2 parallel.inner=ddp grad_accum=2", "grad_accum=2 is not supported with hierarchical workers"),
    ("comm.inner_size=2 parallel.inner=fsdp precision=bf16", "precision=bf16 is not supported with hierarchical workers"),
])
def test_bad_step_keys_are_one_line(override, message):
    with pytest.raises(ConfigError) as e:
        load(None, override.split())
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 is allowed where CUDA is")
def test_fp16_without_cuda_is_refused():
    with pytest.raises(ConfigError, match="precision=fp16 needs CUDA.*use precision=bf16 on CPU"):
        load(None, ["precision=fp16"])


class _Linear(Workload):
    """float64 least squares: the accumulation is checked at float64 precision, not at fp32 noise."""

    def __init__(self) -> None:
        super().__init__(None, seed=0)

    def build_model(self):
        model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1)).double()
        g = generator(0, "init")  # never the global RNG: run_local's workers are threads
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
        return model

    def train_batch(self, step, rank, world_size):
        g = generator(0, step, rank)
        x = torch.randn(8, 5, generator=g, dtype=torch.float64)
        return x, x.sum(-1, keepdim=True).sin()

    def loss(self, model, batch):
        return ((model(batch[0]) - batch[1]) ** 2).mean()

    def evaluate(self, model):
        return {"val_loss": 0.0}


def _ddp_weights(grad_accum: int) -> list:
    w = _Linear()

    def worker(comm):
        model = w.build_model()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        stepper = Stepper(model=model, optimizer=opt, attached=DDP.attach(DDP.Config(), _ctx(model, opt, comm)),
                          workload=w, comm=comm, grad_accum=grad_accum)
        losses = [stepper(w.train_batch(step, comm.rank, comm.world_size)) for step in range(4)]
        return [p.detach().clone() for p in model.parameters()], losses, comm.stats.copy()

    return run_local(2, worker)


def _ctx(model, opt, comm):
    return AttachContext(model=model, optimizer=opt, comm=comm, seed=0, total_steps=4, lr=0.1, workload=None)


def test_ddp_grad_accum_equals_one_big_batch_and_sends_the_same_bytes():
    one, two = _ddp_weights(1), _ddp_weights(2)
    for (w1, l1, s1), (w2, l2, s2) in zip(one, two):
        for a, b in zip(w1, w2):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        assert l1 == pytest.approx(l2, rel=1e-12)
        assert (s2.bytes_sent, s2.collectives) == (s1.bytes_sent, s1.collectives) and s1.bytes_sent > 0
    assert not torch.equal(one[0][0][0], _Linear().build_model()[0].weight)  # it did train


def test_a_nan_micro_batch_skips_the_step_on_every_ddp_worker(tmp_path):
    from dtrain.config import register_workload

    register_workload("toy", "toy_workload")
    summary = run(load(None, ["workload.name=toy", "workload.nan_steps=[2]", "workload.nan_rank=1", "algo.name=ddp",
                              "comm.workers=2", "grad_accum=2", "steps=5", "eval_every=5", f"out_dir={tmp_path}", *LOCAL]))
    assert summary["nonfinite_steps"] == 1  # rank 1's first micro-batch at step 2 is NaN: it stops that step there
    assert summary["skipped_steps"] == 1  # the other worker skipped that update too
    assert len({w["collectives"] for w in summary["comm"]["per_worker"]}) == 1  # and nobody was left waiting


def test_grad_accum_in_a_run_keeps_the_trajectory_and_bytes(tmp_path):
    a1 = _lm(tmp_path, "a1", "algo.name=ddp", "comm.workers=2", "optim.name=sgd", "optim.grad_clip=0")
    a2 = _lm(tmp_path, "a2", "algo.name=ddp", "comm.workers=2", "optim.name=sgd", "optim.grad_clip=0", "grad_accum=2")
    assert a2["final_loss"] == pytest.approx(a1["final_loss"], rel=1e-5)
    assert a2["comm"]["max"]["bytes_sent"] == a1["comm"]["max"]["bytes_sent"]
    assert a2["comm"]["max"]["collectives"] == a1["comm"]["max"]["collectives"]


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("DTRAIN_COMPILE_TESTS"),
                    reason="torch.compile of even a tiny model takes 35-100 s on a shared 2-core CPU; DTRAIN_COMPILE_TESTS=1 runs it")
def test_compile_runs_and_checkpoints_the_original_module(tmp_path):
    summary = run(load(None, ["workload.name=my_models:make", "algo.name=ddp", "comm.workers=1", "steps=2", "eval_every=2",
                              "compile=true", f"out_dir={tmp_path}", *LOCAL[1:], "ckpt_every=2", "comm.name=local"]))
    assert summary["steps"] == 2 and summary["eval"]["value"] < summary["eval"]["initial"]
    saved = torch.load(next((tmp_path / "checkpoints").rglob("*.pt")), weights_only=False)
    assert not any("_orig_mod" in k for k in saved["model"])  # the algorithms and checkpoints see the plain module


def test_train_help_lists_sections_and_keys_with_defaults(capsys):
    from dtrain.cli import main

    assert main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    for key in ("steps=300", "precision=fp32", "grad_accum=1", "compile=False", "optim.lr=null", "optim.grad_clip=1.0",
                "workload.name=char_lm", "workload.batch_size=16", "module.path:factory", "algo.name=diloco",
                "algo.sync_every=500", "comm.name=torch", "parallel.inner=none"):
        assert key in out, key


def test_torch_comm_outside_torchrun_names_the_valid_alternative(tmp_path, monkeypatch):
    from dtrain.comm.base import CommError

    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(CommError) as e:  # `dtrain train` prints it as its one error line
        run(load(None, ["comm.name=torch", "steps=1", f"out_dir={tmp_path}"]))
    msg = str(e.value)
    assert "\n" not in msg and "torchrun --nproc-per-node" in msg and "`comm.name=local comm.workers=4`" in msg


def test_tensorboard_events_hold_the_metrics_scalars(tmp_path):
    pytest.importorskip("tensorboard")
    import json

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run(load(None, ["workload.name=my_models:make", "algo.name=none", "comm.workers=1", "steps=6", "log_every=2",
                    "eval_every=3", "tensorboard=true", f"out_dir={tmp_path}", *LOCAL]))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(tmp_path / "tensorboard")).Reload()
    for tag in ("loss", "lr", "bytes_sent", "eval", "eval/val_loss"):
        key = tag.split("/")[0]
        want = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        got = [(e.step, e.value) for e in events.Scalars(tag)]
        assert [s for s, _ in got] == [s for s, _ in want] and want, tag
        assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6), tag


def test_tensorboard_without_the_package_is_one_line(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    with pytest.raises(ConfigError, match=r'^tensorboard=true needs the tensorboard package: pip install "dtrain\[tensorboard\]"'):
        load(None, ["tensorboard=true"])


def test_fp16_loss_scaling_skips_an_overflow_in_lock_step_then_trains():
    """The fp16 path on CPU (the config allows fp16 only with CUDA; the step itself is device-agnostic)."""
    from dtrain.algorithms.local_only import LocalOnly
    from dtrain.comm.local import LocalGroup

    w = _Linear()
    model = w.build_model().float()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    algo = LocalOnly(opt, LocalGroup(1).comm(0))
    stepper = Stepper(model=model, optimizer=opt, attached=Attached(algorithm=algo), workload=w, precision="fp16")
    stepper.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40)  # the first scaled gradient overflows fp16
    batch = [t.float() for t in w.train_batch(0, 0, 1)]
    before = [p.detach().clone() for p in model.parameters()]
    assert math.isnan(stepper(batch))  # overflow: no update ...
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert algo.step == 1 and stepper.scaler.get_scale() == 2.0**39  # ... but the algorithm stepped, the scale halved
    for _ in range(30):
        stepper(batch)
    assert stepper.scaler.get_scale() < 2.0**20  # it came down to where fp16 gradients fit
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # and then the weights moved
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay fp32


def test_fp16_under_ddp_one_workers_overflow_halves_every_workers_scale():
    """DDP turns a worker's overflowed gradient into zeros and a flag: the scaler must still back off, on all workers."""
    w = _Linear()

    def worker(comm):
        model = w.build_model().float()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        stepper = Stepper(model=model, optimizer=opt, attached=DDP.attach(DDP.Config(), _ctx(model, opt, comm)),
                          workload=w, comm=comm, precision="fp16")
        stepper.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
        x, y = (t.float() for t in w.train_batch(0, comm.rank, 2))
        loss = stepper((x, y * (1e4 if comm.rank == 1 else 1.0)))  # rank 1's fp16 gradient overflows
        return loss, stepper.scaler.get_scale(), [p.detach().clone() for p in model.parameters()]

    (_, s0, w0), (_, s1, w1) = run_local(2, worker)
    assert s0 == s1 == 2.0**7  # both backed off (rank 0's own gradient was fine)
    start = list(w.build_model().float().parameters())
    assert all(torch.equal(a, b) and torch.equal(a, c) for a, b, c in zip(w0, w1, start))  # and both skipped the update
