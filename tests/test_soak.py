"""The soak benchmark's CI variant: a couple of real faulted torchrun jobs, none wrong or lost."""

import json
import subprocess
import sys

import pytest
from dist_utils import REPO, child_env


@pytest.mark.timeout(400)
def test_quick_soak_classifies_every_trial_and_finds_none_wrong(tmp_path):
    out = tmp_path / "soak.json"
    proc = subprocess.run([sys.executable, "benchmarks/soak.py", "--quick", "--stop-within", "60", "--out", str(out)],
                          cwd=REPO, env=child_env(),
                          capture_output=True, text=True, timeout=380)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["totals"]["wrong"] == 0 and result["totals"]["trials"] == 2
    # every process stopped with the reason, no traceback, no hang; how fast is the benchmark's figure
    # (10 s), not a pass/fail on a loaded CI machine
    assert {t["class"] for t in result["trials"]} == {"stopped"}
