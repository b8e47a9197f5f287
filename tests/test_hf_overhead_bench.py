"""Smoke run of benchmarks/hf_overhead.py (--quick): both loops train the same model on the same data."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from dist_utils import REPO, child_env

pytest.importorskip("transformers")


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_hf_overhead_quick(tmp_path):
    out = tmp_path / "hf_overhead.json"
    proc = subprocess.run([sys.executable, "benchmarks/hf_overhead.py", "--quick", "--out", str(out)], cwd=REPO,
                          env=child_env(), capture_output=True, text=True, timeout=230)
    assert proc.returncode == 0, proc.stderr[-3000:]
    payload = json.loads(out.read_text())
    plain, dtrain = (next(r for r in payload["rows"] if r["side"] == side) for side in ("plain", "dtrain"))
    assert payload["ratio"] > 0 and plain["tokens_per_s"] > 0 and dtrain["tokens_per_s"] > 0
    # same init, batches, optimizer and gradient mean: the two loops end at (nearly) the same loss
    assert abs(plain["final_loss"] - dtrain["final_loss"]) < 1e-3 * plain["final_loss"]
    assert "dtrain/plain step time" in proc.stdout
