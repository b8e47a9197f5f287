"""Data safety of a run's out_dir and of a job whose worker fails (issue 13, items 2-5 and 8)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from dist_utils import REPO, child_env, torchrun

from dtrain import checkpoint, config
from dtrain.run_dir import RunDirError, RunDirLock
from dtrain.train import TrainingError, run

TINY = ["workload.n_layer=1", "workload.d_model=32", "workload.n_head=2", "workload.seq_len=32", "workload.batch_size=8",
        "workload.eval_batches=2", "threads=1", "progress=false", "plot=false"]


@pytest.fixture
def toy():
    config.register_workload("toy", "toy_workload")


def _cfg(out, *overrides):
    base = ["workload.name=toy", "comm.name=local", "comm.workers=2", f"out_dir={out}", "progress=false", "plot=false",
            "optim.name=sgd", "optim.lr=0.05", "optim.weight_decay=0", "optim.schedule=constant", "optim.warmup_steps=0",
            "algo.name=diloco", "algo.sync_every=5", "steps=40", "eval_every=20", "ckpt_every=20"]
    return config.load(None, base + list(overrides))


def _files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file() and ".lock" not in p.name}


def test_a_fresh_run_never_writes_into_a_directory_holding_another_run(tmp_path, toy):
    out = tmp_path / "run"
    first = run(_cfg(out))
    before = _files(out)
    with pytest.raises(RunDirError, match=r"holds a finished diloco run of 40 steps.*resume=true.*if_exists=move_aside"):
        run(_cfg(out, "steps=20"))
    assert _files(out) == before  # nothing written, nothing rotated out
    # Resuming it with another trajectory is refused, naming the key.
    with pytest.raises(RunDirError, match=r"belongs to another run \(optim.lr=0.05 there, 0.01 here\)"):
        run(_cfg(out, "optim.lr=0.01", "resume=true"))
    with pytest.raises(RunDirError, match=r"at step 40, past steps=20"):
        run(_cfg(out, "steps=20", "resume=true"))
    assert _files(out) == before
    # move_aside keeps the earlier run whole next to the new one.
    second = run(_cfg(out, "steps=20", "if_exists=move_aside"))
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.prev-")]
    assert len(aside) == 1 and _files(aside[0]) == before
    assert second["steps"] == 20 and json.loads((out / "summary.json").read_text())["steps"] == 20
    assert checkpoint.steps_available(out, 0) == [20] and checkpoint.steps_available(aside[0], 1) == [20, 40]
    assert any("moved to" in w for w in second["warnings"])
    assert first["eval"]["value"] != second["eval"]["value"]


def test_resume_continues_only_its_own_run_and_old_checkpoints_without_identity_are_refused(tmp_path, toy):
    out = tmp_path / "run"
    run(_cfg(out, "steps=20"))
    again = run(_cfg(out, "steps=20", "resume=true", "progress=true"))  # progress is not part of the identity
    assert again["resumed_from"] == 20
    state = checkpoint.load(out, 1, 20)
    del state["identity"]
    checkpoint.save(out, 1, 20, state)
    with pytest.raises(RunDirError, match="carries no run identity"):
        run(_cfg(out, "steps=20", "resume=true"))


def test_a_second_job_on_the_same_out_dir_stops_at_start_naming_the_first(tmp_path):
    out = tmp_path / "busy"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from dtrain.run_dir import RunDirLock; l = RunDirLock(sys.argv[1], 0); "
         "print('held', flush=True); time.sleep(60)", str(out)],
        cwd=REPO, env=child_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        proc = subprocess.run([sys.executable, "-m", "dtrain.cli", "train", "configs/diloco.yaml", f"out_dir={out}",
                               "comm.name=local", "comm.workers=2", "steps=5", *TINY],
                              cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=120)
    finally:
        holder.kill()
        holder.wait()
    assert proc.returncode == 1
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and f"is in use by another job (pid {holder.pid} on" in lines[0], proc.stderr
    assert not (out / "metrics.jsonl").exists() and not (out / "config.yaml").exists()
    # A killed holder leaves no stale lock: the kernel dropped it with the process.
    RunDirLock(out, 0).release()


@pytest.mark.timeout(300)
def test_torchrun_restart_without_resume_flag_resumes_from_the_last_checkpoint(tmp_path):
    common = [*TINY, "algo.sync_every=10", "steps=40", "eval_every=40", "ckpt_every=20"]
    ref = run(config.load("configs/diloco.yaml", [*common, f"out_dir={tmp_path / 'ref'}", "comm.name=local", "comm.workers=2"]))
    out = tmp_path / "killed"
    # Rank 1 SIGKILLs itself at its 5th collective (after the step-20 checkpoint); no resume=true anywhere.
    proc = torchrun(2, ["-m", "dtrain.testing.faults", "--kill-at-call", "5", "--only-first-attempt", "--only-rank", "1",
                        "--", "configs/diloco.yaml", f"out_dir={out}", *common],
                    extra_torchrun=["--max-restarts", "1"], timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "exitcode: -9" in proc.stderr, proc.stderr[-3000:]
    got = json.loads((out / "summary.json").read_text())
    assert got["resumed_from"] == 20
    assert got["final_loss"] == pytest.approx(ref["final_loss"], rel=1e-6)
    assert checkpoint.steps_available(out, 0) == [20, 40]


def _tiny_job(out: Path, *extra: str, nproc: int = 2) -> subprocess.CompletedProcess:
    return torchrun(nproc, ["-m", "dtrain.cli", "train", "configs/diloco.yaml", f"out_dir={out}", *TINY, "algo.sync_every=10",
                            "steps=20", "eval_every=20", "ckpt_every=10", "comm.timeout_s=300", *extra], timeout=240)


@pytest.mark.timeout(300)
def test_a_foreign_checkpoint_on_one_rank_stops_every_worker_with_its_reason(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert _tiny_job(a).returncode == 0
    assert _tiny_job(b, "workload.d_model=64").returncode == 0
    for step in (10, 20):  # rank 1 holds the other model's checkpoints under this run's name
        theirs = checkpoint.load(b, 1, step)
        theirs["identity"] = checkpoint.load(a, 1, step)["identity"]  # even a forged identity: shapes are checked
        checkpoint.save(a, 1, step, theirs)
    proc = _tiny_job(a, "resume=true")
    assert proc.returncode != 0
    reasons = [ln for ln in proc.stderr.splitlines() if ln.startswith("dtrain: error:")]
    assert len(reasons) == 2, proc.stderr[-3000:]  # both processes, one line each
    assert all("tok_emb.weight of shape (256, 64), the model built from this config has (256, 32)" in r
               for r in reasons), reasons
    assert any(r.startswith("dtrain: error: rank 1 stopped:") for r in reasons)  # rank 0 heard it from rank 1
    assert f'File "{REPO / "dtrain"}' not in proc.stderr  # no traceback from our code


@pytest.mark.timeout(300)
def test_an_exception_on_one_worker_stops_the_others_with_its_reason(tmp_path):
    # Rank 1 raises at its 3rd collective, in the middle of training; rank 0 is blocked in the next
    # outer all-reduce with comm.timeout_s=300 and must leave with rank 1's reason instead.
    proc = torchrun(2, ["-m", "dtrain.testing.faults", "--exit-at-call", "3", "--only-rank", "1", "--",
                        "configs/diloco.yaml", f"out_dir={tmp_path}", *TINY, "algo.sync_every=5", "steps=40",
                        "comm.timeout_s=300"], timeout=240)
    assert proc.returncode != 0
    assert "dtrain: error: rank 1 stopped: faults: exit at call 3" in proc.stderr, proc.stderr[-3000:]


def test_noop_configs_warn_once_and_are_listed_in_the_summary(tmp_path, toy):
    summary = run(_cfg(tmp_path / "a", "algo.sync_every=500"))
    assert any("algo.sync_every=500 > steps=40" in w for w in summary["warnings"])
    summary = run(_cfg(tmp_path / "b", "comm.workers=1", "algo.name=noloco"))
    assert any("algo.name=noloco with 1 worker" in w for w in summary["warnings"])
    summary = run(_cfg(tmp_path / "c"))
    assert summary["warnings"] == []


def test_binary_data_and_a_corrupt_checkpoint_are_warned_of(tmp_path, capfd):
    data = tmp_path / "blob.bin"
    noise = torch.randint(0, 256, (400, 300), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    data.write_bytes(b"\n\n".join(bytes(row.tolist()).replace(b"\n", b" ") for row in noise))
    cfg = config.load("configs/diloco.yaml", [*TINY, "comm.name=local", "comm.workers=2", f"workload.data_path={data}",
                                              f"out_dir={tmp_path / 'r'}", "steps=20", "ckpt_every=10", "eval_every=20"])
    summary = run(cfg)
    assert any("does not look like UTF-8 text" in w for w in summary["warnings"])
    bad = checkpoint.rank_dir(tmp_path / "r", 1) / "step_00000020.pt"
    bad.write_bytes(bad.read_bytes()[:100])
    capfd.readouterr()
    resumed = run(config.load("configs/diloco.yaml", [*TINY, "comm.name=local", "comm.workers=2", "resume=true",
                                                      f"workload.data_path={data}", f"out_dir={tmp_path / 'r'}", "steps=20",
                                                      "ckpt_every=10", "eval_every=20"]))
    assert resumed["resumed_from"] == 10
    assert any("rank 1: checkpoint" in w and "is corrupt" in w for w in resumed["warnings"])
    assert "dtrain: warning: rank 1: checkpoint" in capfd.readouterr().err


def test_nonfinite_weights_are_never_checkpointed(tmp_path, toy):
    # SGD at lr 3e38: finite gradients, an update that overflows float32 on the first step.
    cfg = _cfg(tmp_path, "optim.lr=3e38", "optim.grad_clip=0", "ckpt_every=1", "steps=30")
    with pytest.raises(TrainingError, match="not checkpointing them"):
        run(cfg)
    for rank in (0, 1):
        for step in checkpoint.steps_available(tmp_path, rank):
            state = checkpoint.load(tmp_path, rank, step)
            assert all(bool(torch.isfinite(v).all()) for v in state["model"].values())
