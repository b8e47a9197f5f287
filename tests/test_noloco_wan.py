"""launchers/wan.py: the shaped links really are slow and late, and nothing is left behind."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest
from dist_utils import REPO


def _netns_usable() -> bool:
    if os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("tc") is None:
        return False
    name = f"dtprobe{os.getpid()}"
    ok = subprocess.run(["ip", "netns", "add", name], capture_output=True).returncode == 0
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return ok


@pytest.mark.timeout(90)
@pytest.mark.skipif(not _netns_usable(), reason="needs root with ip netns and tc")
def test_wan_links_are_shaped_delayed_and_cleaned_up():
    tag = f"dtt{os.getpid() % 10000}"
    proc = subprocess.run([sys.executable, str(REPO / "launchers" / "wan.py"), "--workers", "2", "--rate", "20mbit",
                           "--delay-ms", "40", "--tag", tag, "--probe"], capture_output=True, text=True, timeout=80)
    assert proc.returncode == 0, proc.stderr[-2000:]
    m = re.search(r"rtt_ms=([\d.]+) mbit_s=([\d.]+)", proc.stdout)
    assert m, proc.stdout
    rtt, mbit = float(m.group(1)), float(m.group(2))
    assert rtt >= 80  # 40 ms each way through the delay daemon
    assert mbit <= 21  # tbf holds the link to 20 Mbit/s
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert tag not in left
