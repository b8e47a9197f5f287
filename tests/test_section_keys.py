"""Every key of the workload and comm sections changes what runs; a mixed fp32/bf16 model under HDET."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from dtrain import config
from dtrain.algorithms.hdet import HDET
from dtrain.comm.local import LocalGroup, run_local
from dtrain.train import Parts, run
from dtrain.workloads import char_lm

TINY = {"n_layer": 1, "d_model": 32, "n_head": 2, "seq_len": 16, "batch_size": 4, "eval_batches": 1, "eval_batch_size": 4}


def _fingerprint(cfg) -> tuple:
    """What a workload section decides: the model's shapes, the first batches, the evaluation, the target."""
    parts = Parts.build(cfg, LocalGroup(1).comm(0))
    w = parts.workload
    shapes = tuple(tuple(p.shape) for p in parts.model.parameters())
    batch = w.train_batch(0, 0, 1)
    return shapes, tuple(t.sum().item() for t in batch if isinstance(t, torch.Tensor)), tuple(batch[0].shape), \
        w.evaluate(parts.model)["val_loss"], w.target, w.time_budget_s


def test_every_char_lm_key_changes_the_model_data_evaluation_or_target(tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(f"paragraph {i}: " + "lorem ipsum dolor sit amet " * 5 for i in range(400)))
    other = {"data_path": str(text), "seq_len": 24, "batch_size": 6, "n_layer": 2, "n_head": 4, "d_model": 48,
             "val_fraction": 0.2, "eval_batches": 2, "eval_batch_size": 6, "target": 1.5, "time_budget_s": 60.0}
    keys = [f.name for f in dataclasses.fields(char_lm.Config) if f.name != "name"]
    assert sorted(keys) == sorted(other), "a char_lm key has no case here"
    base = [f"workload.{k}={v}" for k, v in TINY.items()]
    reference = _fingerprint(config.load(None, base))
    for key, value in other.items():
        changed = _fingerprint(config.load(None, [*base, f"workload.{key}={value}"]))
        assert changed != reference, key


def test_local_comm_keys_act(tmp_path):
    config.register_workload("toy", "toy_workload")
    common = ["workload.name=toy", "comm.name=local", "algo.name=diloco", "algo.sync_every=5", "steps=10", "eval_every=10",
              "ckpt_every=0", "progress=false", "plot=false"]
    two = run(config.load(None, [*common, "comm.workers=2", f"out_dir={tmp_path / 'a'}"]))
    three = run(config.load(None, [*common, "comm.workers=3", f"out_dir={tmp_path / 'b'}"]))
    assert (two["world_size"], three["world_size"]) == (2, 3)
    # comm.timeout_s only decides how long a silent peer is waited for (tests/test_comm.py waits one out)
    with pytest.raises(config.ConfigError, match="comm.timeout_s"):
        config.load(None, [*common, "comm.timeout_s=0"])


def _mixed_model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 1))
    model[1].to(torch.bfloat16)
    return model


def test_hdet_averages_a_mixed_fp32_bf16_model_per_dtype():
    def worker(comm):
        model = _mixed_model()
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        sched = HDET(opt, max_lr=0.05, total_steps=10, comm=comm, converge_every=5, spread=0.5)
        g = torch.Generator().manual_seed(comm.rank)
        for _ in range(10):
            x = torch.randn(8, 6, generator=g)
            loss = model[1](model[0](x).to(torch.bfloat16)).float().pow(2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            sched.step(float(loss))
        return [p.detach().clone() for p in model.parameters()]

    results = run_local(3, worker)
    start = [p.detach() for p in _mixed_model().parameters()]
    for i, p in enumerate(results[0]):
        assert p.dtype == start[i].dtype  # bf16 stays bf16, fp32 stays fp32
        assert all(torch.equal(p, r[i]) for r in results[1:])  # averaged at step 10: one model on every replica
        assert not torch.equal(p, start[i])  # and it trained
