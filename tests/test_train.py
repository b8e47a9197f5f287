"""The `dtrain train` loop: outputs, resume after a kill, bad input, non-finite losses."""

import json
import signal
import subprocess
import sys
import time

import pytest
import torch
from dist_utils import REPO, child_env, cli, free_port, train

from dtrain import checkpoint, config
from dtrain.train import TrainingError, run


@pytest.fixture
def toy():
    config.register_workload("toy", "toy_workload")


def _cfg(tmp_path, *overrides):
    base = ["workload.name=toy", "comm.name=local", f"out_dir={tmp_path}", "progress=false", "plot=false",
            "optim.name=sgd", "optim.lr=0.05", "optim.weight_decay=0", "optim.schedule=constant", "optim.warmup_steps=0",
            "steps=30", "eval_every=10", "ckpt_every=0"]
    return config.load(None, base + list(overrides))


def test_summary_and_metrics_written(tmp_path, toy):
    summary = run(_cfg(tmp_path, "comm.workers=2", "algo.name=diloco", "algo.sync_every=10"))
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk == summary
    for key in ("algorithm", "workload", "world_size", "steps", "wall_s", "final_loss", "eval", "reached_target",
                "time_to_target_s", "peak_mem_bytes", "comm"):
        assert key in summary
    assert summary["world_size"] == 2 and len(summary["comm"]["per_worker"]) == 2
    assert summary["comm"]["max"]["collectives"] == 3  # 30 steps / H=10
    assert summary["eval"]["value"] < summary["eval"]["initial"]
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "eval" in r] == [0, 10, 20, 30]
    assert rows[0]["eval"] == summary["eval"]["initial"]
    assert all({"wall_s", "loss", "lr", "bytes_sent", "bytes_recv"} <= r.keys() for r in rows if "loss" in r)


def test_nan_loss_never_reaches_the_weights_and_is_reported(tmp_path, toy):
    # rank 1's loss is NaN on steps 3 and 4: under DDP every worker skips those updates together
    summary = run(_cfg(tmp_path, "comm.workers=2", "algo.name=ddp", "workload.nan_steps=[3,4]", "workload.nan_rank=1"))
    assert summary["nonfinite_steps"] == 2
    assert summary["skipped_steps"] == 2
    assert all(w["skipped_steps"] == 2 for w in summary["workers"])
    assert summary["eval"]["value"] is not None and summary["final_loss"] is not None
    ranks = [w["eval"]["val_loss"] for w in summary["workers"]]
    assert ranks[0] == ranks[1]  # replicas still identical


def test_persistent_nan_stops_with_a_clear_message(tmp_path, toy):
    cfg = _cfg(tmp_path, "comm.workers=1", "algo.name=none", "max_nonfinite=3", f"workload.nan_steps={list(range(5, 30))}")
    with pytest.raises(TrainingError, match="NaN/Inf for 3 consecutive steps.*lower optim.lr"):
        run(cfg)


def test_sgd_nan_skip_leaves_weights_untouched(tmp_path, toy):
    # steps 0-3 NaN, step 4 finite: the final weights are the initial ones plus exactly one SGD step
    cfg = _cfg(tmp_path, "comm.workers=1", "algo.name=none", "max_nonfinite=100", "steps=5",
               "workload.nan_steps=[0,1,2,3]", "ckpt_every=5")
    run(cfg)
    final = checkpoint.load(tmp_path, 0, 5)["model"]
    # one real step on step 4's batch, by hand
    from toy_workload import Toy

    wl = Toy(cfg.workload, seed=0)
    model = wl.build_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    wl.loss(model, wl.train_batch(4, 0, 1)).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    for k, v in model.state_dict().items():
        assert torch.equal(final[k], v), k


@pytest.mark.parametrize(
    "override, key",
    [("algo.bogus=1", "algo.bogus"), ("optim.lr=-1", "optim.lr"), ("steps=abc", "steps"),
     ("algo.sync_every=0", "algo.sync_every"), ("workload.name=imagenet", "workload.name"),
     ("comm.backend=mpi", "comm.backend"), ("workload.data_path=/nonexistent.txt", "workload.data_path")],
)
def test_bad_config_is_one_line_naming_the_key(override, key):
    proc = cli("train", "configs/diloco.yaml", override)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert key in lines[0] and "Traceback" not in proc.stderr


def test_missing_config_file_and_corrupt_checkpoint(tmp_path, toy):
    proc = cli("train", "configs/nope.yaml")
    assert proc.returncode != 0 and "configs/nope.yaml not found" in proc.stderr
    run(_cfg(tmp_path, "comm.workers=1", "algo.name=none", "steps=10", "ckpt_every=5"))
    ckpt = checkpoint.rank_dir(tmp_path, 0) / "step_00000010.pt"
    ckpt.write_bytes(b"garbage" * 10)
    # the corrupt newest checkpoint is passed over; the run resumes from step 5 and finishes
    summary = run(_cfg(tmp_path, "comm.workers=1", "algo.name=none", "steps=10", "ckpt_every=5", "resume=true"))
    assert summary["steps"] == 10 and summary["resumed_from"] == 5
    ckpt.write_bytes(b"x")
    with pytest.raises(checkpoint.CheckpointError, match="corrupt.*delete it"):
        checkpoint.load(tmp_path, 0, 10)


def _final_state(out_dir, rank, step):
    return checkpoint.load(out_dir, rank, step)


@pytest.mark.timeout(300)
def test_killed_run_resumes_bit_identical(tmp_path):
    args = ["configs/diloco.yaml", "steps=160", "algo.sync_every=10", "ckpt_every=10", "eval_every=100",
            "workload.n_layer=1", "workload.d_model=32", "workload.n_head=2", "workload.batch_size=8"]
    full = tmp_path / "full"
    train(2, args[0], full, *args[1:])
    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), "-m", "dtrain.cli", "train", *args, f"out_dir={killed}", "progress=false", "plot=false"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 200
    while time.time() < deadline and not all(checkpoint.steps_available(killed, r) for r in (0, 1)):
        time.sleep(0.05)
    _kill_tree(proc.pid)
    proc.wait()
    assert not (killed / "summary.json").exists(), "the run finished before it could be killed"
    summary = train(2, args[0], killed, *args[1:], "resume=true")
    assert 10 <= summary["resumed_from"] < 160  # really continued mid-run, not restarted
    for r in (0, 1):
        a, b = _final_state(full, r, 160), _final_state(killed, r, 160)
        for part in ("model", "algorithm"):
            flat_a, flat_b = _tensors(a[part]), _tensors(b[part])
            assert len(flat_a) == len(flat_b) > 0
            assert all(torch.equal(x, y) for x, y in zip(flat_a, flat_b)), f"rank {r} {part} differs after resume"
    ref = json.loads((full / "summary.json").read_text())
    assert summary["eval"]["value"] == ref["eval"]["value"]
    assert summary["comm"]["max"]["collectives"] == ref["comm"]["max"]["collectives"] == 16


def _kill_tree(pid):
    """SIGKILL torchrun and its workers (they are not in its process group)."""
    import psutil

    root = psutil.Process(pid)
    procs = [root, *root.children(recursive=True)]
    for p in procs:
        p.send_signal(signal.SIGKILL)
    psutil.wait_procs(procs, timeout=30)


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for k in sorted(obj, key=str) for t in _tensors(obj[k])]
    if isinstance(obj, (list, tuple)):
        return [t for x in obj for t in _tensors(x)]
    return []
