"""Fault tolerance on the torch backend: torchrun elastic restarts resume from the last checkpoint."""

from __future__ import annotations

import json

import pytest
import torch
from dist_utils import torchrun

from dtrain.config import load
from dtrain.train import run

COMMON = [
    "workload.name=char_lm", "workload.n_layer=1", "workload.d_model=32", "workload.n_head=2", "workload.seq_len=32",
    "workload.batch_size=8", "workload.eval_batches=2", "algo.sync_every=10", "steps=40", "eval_every=40",
    "ckpt_every=20", "threads=1", "resume=true",
]


@pytest.mark.timeout(300)
def test_rank_killed_under_torchrun_restarts_from_checkpoint_and_matches(tmp_path):
    # Uninterrupted reference on the local backend: with two workers a sum has one order, so
    # its numbers equal gloo's bit for bit (and it costs no second torchrun job).
    torch.set_num_threads(1)
    ref = run(load("configs/diloco.yaml", [*COMMON, f"out_dir={tmp_path / 'ref'}", "comm.name=local", "comm.workers=2",
                                           "progress=false", "plot=false"]))
    # Rank 1 SIGKILLs itself at its 5th collective (broadcast, resume agreement, syncs at 10, 20,
    # 30): after the step-20 checkpoint. Its first attempt runs resume=true on an empty out_dir,
    # the fresh-start path. torchrun restarts both workers once; they resume at 20.
    out = tmp_path / "killed"
    proc = torchrun(2, ["-m", "dtrain.testing.faults", "--kill-at-call", "5", "--only-first-attempt", "--only-rank", "1",
                        "--", "configs/diloco.yaml", f"out_dir={out}", "progress=false", "plot=false", *COMMON],
                    extra_torchrun=["--max-restarts", "1"], timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "exitcode: -9" in proc.stderr, proc.stderr[-3000:]  # torchrun saw the kill and restarted
    got = json.loads((out / "summary.json").read_text())
    assert got["resumed_from"] == 20
    assert got["final_loss"] == pytest.approx(ref["final_loss"], rel=1e-6)
    assert got["eval"]["value"] == pytest.approx(ref["eval"]["value"], rel=1e-6)
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 40
