"""The launchers start the same entry point: accelerate launch and multi-node torchrun (2 'nodes')."""

import json
import subprocess
import sys

import pytest
from dist_utils import REPO, child_env, free_port

SMALL = ["steps=10", "algo.sync_every=5", "workload.n_layer=1", "workload.d_model=32", "workload.n_head=2",
         "progress=false", "plot=false", "ckpt_every=0", "eval_every=10"]


@pytest.mark.timeout(240)
def test_accelerate_launch_runs_dtrain_train(tmp_path):
    out = tmp_path / "acc"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "launchers/accelerate.yaml",
           "--main_process_port", str(free_port()), "-m", "dtrain.cli", "train", "configs/diloco.yaml", f"out_dir={out}", *SMALL]
    proc = subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=220)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["workers_reporting"] == 2
    assert summary["comm"]["max"]["collectives"] == 2


@pytest.mark.timeout(240)
def test_multinode_script_with_c10d_rendezvous(tmp_path):
    # two "nodes" on loopback, one process each, meeting at a c10d rendezvous endpoint
    out = tmp_path / "mn"
    endpoint = f"127.0.0.1:{free_port()}"
    env = child_env(PATH=f"{sys.prefix}/bin:" + child_env()["PATH"])
    cmd = ["bash", "launchers/torchrun_multinode.sh", "--nnodes", "2", "--nproc", "1", "--endpoint", endpoint,
           "--run-id", "t", "--", "configs/diloco.yaml", f"out_dir={out}", *SMALL]
    nodes = [subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=220) for p in nodes]
    assert all(p.returncode == 0 for p in nodes), outs[0][1][-2000:] + outs[1][1][-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["comm"]["max"]["collectives"] == 2


def test_multinode_script_rejects_missing_endpoint():
    proc = subprocess.run(["bash", "launchers/torchrun_multinode.sh", "--nnodes", "2"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and "--endpoint" in proc.stderr
