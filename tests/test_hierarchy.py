"""Hierarchical workers over real torchrun/gloo: 4 processes = 2 workers x 2 processes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from dist_utils import REPO, child_env, torchrun, train
from test_noloco_wan import _netns_usable

from dtrain import config, run_dir
from dtrain.checkpoint_dcp import load_full


@pytest.mark.timeout(240)
def test_sharded_and_replicated_workers_match_unsharded_references(tmp_path):
    proc = torchrun(4, ["tests/scripts/hierarchy.py", str(tmp_path)], timeout=200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = json.loads((tmp_path / "result.json").read_text())
    assert [(r["worker"], r["inner_rank"]) for r in ranks] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for r in ranks:
        outer, inner = str(r["outer_group"]), str(r["inner_group"])
        # process i of worker a meets process i of worker b; a worker is consecutive ranks
        assert r["outer_group"] == [r["inner_rank"], r["inner_rank"] + 2]
        assert r["inner_group"] == [2 * r["worker"], 2 * r["worker"] + 1]
        assert r["param_is_dtensor"]
        # FSDP2 inside + DiLoCo across equals DiLoCo over un-sharded workers (float64 rounding only)
        assert r["diloco_diff"] < 1e-12 and r["fsdp_outer_syncs"] == 2
        # every call on the outer group is an outer-comm collective; nothing spans the whole job
        assert set(r["fsdp_group_counts"]) == {outer, inner}
        assert r["fsdp_group_counts"][outer] == r["fsdp_outer"]["collectives"] == 3
        assert r["fsdp_inner"]["collectives"] > 0 and r["fsdp_inner"]["bytes_sent"] > 0
        # resumed from the DCP checkpoint: bit for bit
        assert r["resume_bitwise"]
        # DDP inside + NoLoCo across, and Prodigy with d reduced over the shards
        assert r["noloco_diff"] < 1e-12 and r["noloco_fsdp_diff"] < 1e-12 and r["noloco_state_roundtrip"]
        assert r["noloco_bad_shard_failures"] == (1 if r["worker"] == 0 else 0) and r["noloco_bad_shard_finite"]
        assert r["ddp_over_fsdp_diff"] < 1e-12 and r["ddp_over_ddp_diff"] < 1e-12
        assert r["streaming_diff"] < 1e-12 and r["streaming_syncs_fsdp"] == r["streaming_syncs_ref"] == 3
        assert r["hdet_diff"] < 1e-12 and r["hdet_lr_fsdp"] == pytest.approx(r["hdet_lr_ref"], rel=1e-12)
        for name in ("prodigy", "dadapt_adam", "dadapt_sgd", "dog", "ldog"):
            assert r[f"{name}_diff"] < 1e-12, name
            assert r[f"{name}_d"][0] == pytest.approx(r[f"{name}_d"][1], rel=1e-12), name
            assert r[f"{name}_d"][0] > 1e-6, name  # d grew from its start d0 = 1e-6 (DoG: rbar > 0)
    # outer traffic: each process sends its shard, so a worker's processes together send one model copy
    for worker in (0, 1):
        mine = [r for r in ranks if r["worker"] == worker]
        assert sum(r["fsdp_outer"]["bytes_sent"] for r in mine) == mine[0]["ref_outer"]["bytes_sent"]
        assert all(r["fsdp_outer"]["bytes_sent"] < 0.6 * r["ref_outer"]["bytes_sent"] for r in mine)


TINY = ["workload.n_layer=1", "workload.d_model=32", "workload.n_head=2", "workload.eval_batches=1", "steps=4",
        "ckpt_every=2", "eval_every=4", "algo.sync_every=2", "parallel.inner=fsdp"]


@pytest.mark.timeout(240)
def test_train_resumes_a_sharded_run_with_another_inner_size(tmp_path):
    """dtrain train: 2 workers x 2 FSDP2 processes, checkpoints by DCP; the same run resumed from
    step 2 as 2 workers x 1 process ends where the original did (a worker's batch does not depend on k)."""
    a = train(4, "configs/diloco.yaml", tmp_path / "a", *TINY, "comm.inner_size=2")
    assert a["hierarchy"] == {**a["hierarchy"], "workers": 2, "inner_size": 2, "processes": 4}
    assert a["world_size"] == 2 and a["comm"]["max"]["bytes_sent"] > 0 and a["comm_inner"]["max"]["bytes_sent"] > 0
    assert a["workers"][0]["algorithm"]["outer_syncs"] == 2
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    for worker in (0, 1):
        shutil.rmtree(tmp_path / "b" / "checkpoints" / f"worker{worker}" / "step_00000004")
    (tmp_path / "b" / "summary.json").unlink()
    b = train(2, "configs/diloco.yaml", tmp_path / "b", *TINY, "comm.inner_size=1", "resume=true")
    assert b["resumed_from"] == 2 and b["hierarchy"]["inner_size"] == 1
    for worker in (0, 1):
        ends = [load_full(tmp_path / run / "checkpoints" / f"worker{worker}" / "step_00000004") for run in ("a", "b")]
        model_a, model_b = ends[0]["model"], ends[1]["model"]
        assert model_a.keys() == model_b.keys()
        assert max(float((model_a[k] - model_b[k]).abs().max()) for k in model_a) < 1e-5
        assert ends[1]["algorithm"]["outer_syncs"] == 2


def test_a_sharded_checkpoint_of_another_inner_kind_is_foreign(tmp_path):
    cfg = config.load("configs/diloco.yaml", ["comm.inner_size=2", "parallel.inner=fsdp"])
    other = config.load("configs/diloco.yaml", ["comm.inner_size=2", "parallel.inner=ddp"])
    resized = config.load("configs/diloco.yaml", ["comm.inner_size=1", "parallel.inner=fsdp"])
    mine = run_dir.identity(cfg, 2)
    assert "parallel.inner=ddp there, fsdp here" in run_dir.identity_mismatch(run_dir.identity(other, 2), mine)
    assert run_dir.identity_mismatch(run_dir.identity(resized, 2), mine) is None  # k may change; workers may not
    assert "world_size" in run_dir.identity_mismatch(run_dir.identity(resized, 4), mine)


@pytest.mark.parametrize("overrides, words", [
    (["comm.inner_size=2"], "needs parallel.inner=fsdp"),
    (["parallel.inner=fsdp", "comm.name=local"], "needs comm.name=torch"),
    (["parallel.inner=fsdp", "algo.name=spsa"], "forward passes only"),
    (["parallel.inner=ddp", "algo=[lisa,diloco]"], "LISA"),
    (["comm.inner_size=0", "parallel.inner=fsdp"], "comm.inner_size must be >= 1"),
    (["parallel.inner=fsdp", "optim.name=nadamw"], "does not step sharded"),
    (["parallel.inner=fsdp", "algo.name=diloco", "algo.robust=median"], "judge each shard apart"),
])
def test_hierarchy_config_errors_are_one_line(overrides, words):
    with pytest.raises(config.ConfigError, match=words) as err:
        config.load(None, overrides)
    assert "\n" not in str(err.value)


@pytest.mark.timeout(200)
@pytest.mark.skipif(not _netns_usable(), reason="needs root with ip netns and tc")
def test_quick_hierarchy_benchmark_sends_half_a_model_per_process_per_outer_step(tmp_path):
    out = tmp_path / "hierarchy.json"
    proc = subprocess.run([sys.executable, "benchmarks/hierarchy.py", "--quick", "--out", str(out)], cwd=REPO,
                          env=child_env(), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    (r,) = json.loads(out.read_text())["rows"]
    cfg = config.load("configs/diloco.yaml", ["workload.n_layer=2", "workload.d_model=64", "workload.n_head=4"])
    model = config.section_module("workload", "char_lm").build(cfg.workload, seed=0).build_model()
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    # 2 workers: a ring all-reduce moves each process's shard once; the two shards of a worker make one model
    assert r["system"] == "diloco/fsdp" and r["outer_syncs"] == 2
    assert r["outer_bytes_per_process_per_sync"] == pytest.approx(model_bytes / 2, rel=0.01)
    assert r["inner_bytes_per_process"] > 0


class _Boom:
    def __reduce__(self):
        return (print, ("unpickled a foreign object",))


def test_dcp_metadata_reader_admits_only_metadata_classes(tmp_path, capsys):
    import pickle

    from dtrain.checkpoint_dcp import _SafeReader

    (tmp_path / ".metadata").write_bytes(pickle.dumps(_Boom()))
    with pytest.raises(pickle.UnpicklingError, match="builtins.print is not part of DCP metadata"):
        _SafeReader(str(tmp_path)).read_metadata()
    assert "unpickled" not in capsys.readouterr().out
