"""Smoke runs of the frontier benchmarks (--quick): they finish, write their outputs, and the bytes each
method sends per worker follow from its schedule (counted by the comm, read from summary.json)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from dist_utils import REPO, child_env


def _bench(script: str, *args: str, timeout: float) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, f"benchmarks/{script}", "--quick", *args], cwd=REPO, env=child_env(),
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.timeout(300)
def test_frontier_quick(tmp_path):
    out = tmp_path / "frontier.json"
    _bench("frontier.py", "--cache", str(tmp_path / "cache"), "--out", str(out), timeout=290)
    payload = json.loads(out.read_text())
    rows = {(r["regime"], r["method"], r["H"]): r for r in payload["rows"]}
    ddp, diloco = rows[("main", "ddp", None)], rows[("main", "diloco", 10)]
    noloco, int8 = rows[("main", "noloco", 10)], rows[("main", "noloco_int8", 10)]
    assert ddp["seeds"] == 2 and ddp["val_loss_std"] is not None
    # 2 workers: DDP all-reduces every step, DiLoCo every 10th (plus the same initial broadcast each)
    assert 9 < diloco["fewer_bytes"] < 10.5
    # NoLoCo sends two model copies per outer step to its partner; int8 a quarter of that plus scales
    assert abs(noloco["bytes_sent_per_worker"] / diloco["bytes_sent_per_worker"] - 2) < 0.1
    assert int8["bytes_sent_per_worker"] < 0.3 * noloco["bytes_sent_per_worker"]
    assert {t["method"] for t in payload["sweep"]["trials"]} == {"ddp", "diloco", "noloco"}
    for suffix in (".png", ".txt"):
        assert out.with_suffix(suffix).stat().st_size > 0
    assert (tmp_path / "frontier_curves.png").stat().st_size > 0
    assert all(r["runs"][0]["curve"] for r in payload["rows"])  # every run left its loss curve


@pytest.mark.timeout(300)
def test_ddp_speed_quick(tmp_path):
    _bench("ddp_speed.py", "--out", str(tmp_path / "ddp.json"), timeout=240)
    rows = json.loads((tmp_path / "ddp.json").read_text())["rows"]
    assert rows[0]["skipped_steps"] == 0 and rows[0]["ratio"] > 0


@pytest.mark.timeout(200)
def test_batch_curve_quick(tmp_path):
    _bench("batch_curve.py", "--out", str(tmp_path / "batch.json"), timeout=150)
    rows = json.loads((tmp_path / "batch.json").read_text())["rows"]
    assert [r["batch"] for r in rows] == [4, 16] and rows[0]["gain_4x"] is not None


@pytest.mark.timeout(200)
def test_torchft_diloco_quick(tmp_path):
    pytest.importorskip("torchft", reason="the optional .[compare] extra")
    _bench("torchft_diloco.py", "--out", str(tmp_path / "tft.json"), timeout=190)
    row = json.loads((tmp_path / "tft.json").read_text())["row"]
    assert row["outer_steps"] == 4  # 20 steps at H=5: torchft's manager committed every outer step
    assert row["val_loss"] < 5.0  # it trained (the untrained loss is ln 256 = 5.55)


@pytest.mark.timeout(200)
def test_noloco_gap_quick_pairs_of_two_are_diloco_with_its_optimizer(tmp_path):
    _bench("noloco_gap.py", "--out", str(tmp_path / "gap.json"), timeout=190)
    payload = json.loads((tmp_path / "gap.json").read_text())
    rows = {r["variant"]: r for r in payload["rows"]}
    # 2 workers: NoLoCo's pair is everyone, so its step is DiLoCo's with outer SGD (no Nesterov) and the
    # same lr and momentum; it sends phi and delta (2 copies) where the all-reduce sends 2(N-1)/N = 1
    assert abs(rows["NoLoCo"]["val_loss"] - rows["DiLoCo SGD"]["val_loss"]) < 1e-5
    assert abs(rows["NoLoCo"]["val_loss"] - rows["DiLoCo"]["val_loss"]) > 1e-3  # Nesterov 0.9 is another run
    assert rows["NoLoCo"]["bytes_sent_per_worker"] == 2 * rows["DiLoCo SGD"]["bytes_sent_per_worker"]
    # and with algo.nesterov=true its step is DiLoCo's own (Nesterov 0.7 / 0.9)
    assert abs(rows["NoLoCo Nesterov"]["val_loss"] - rows["DiLoCo"]["val_loss"]) < 1e-5
    # so the outer-lr sweep finds the same loss for both at every lr, and the same winner
    swept = {(r["method"], r["outer_lr"]): r["val_loss"] for r in payload["outer_lr_sweep"]}
    assert len(swept) == 4 and len({lr for _, lr in swept}) == 2
    assert all(abs(swept[("NoLoCo Nesterov", lr)] - v) < 1e-5 for (m, lr), v in swept.items() if m == "DiLoCo")
    diloco, noloco = payload["tuned"]
    assert noloco["outer_lr"] == diloco["outer_lr"] and abs(noloco["vs_diloco_pct"]) < 1e-3
