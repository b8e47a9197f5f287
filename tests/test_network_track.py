"""The network track's cost model on hand-computed traffic, and a smoke run of benchmarks/network_track.py."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from dtrain.scoring import network as N

ROOT = Path(__file__).resolve().parents[1]


def record(*, rank: int = 0, train: float, blocked: float, sent: int, recv: int, messages: int, collectives: int) -> dict:
    return {"rank": rank, "train_time_s": train, "comm": {"bytes_sent": sent, "bytes_recv": recv, "messages": messages,
                                                          "collectives": collectives, "blocked_s": blocked}}


def test_profiles_and_parsing() -> None:
    assert N.PROFILES["datacenter"] == N.NetworkProfile("datacenter", 100e9, 5e-6)
    assert N.PROFILES["wan"].bandwidth_bit_s == 1e9 and N.PROFILES["wan"].latency_s == 0.05
    assert N.PROFILES["internet"].bandwidth_bit_s == 100e6 and N.PROFILES["internet"].latency_s == 0.1
    p = N.parse_profile("100mbit+50ms")
    assert (p.bandwidth_bit_s, p.latency_s) == (100e6, 0.05)
    with pytest.raises(ValueError, match="use datacenter, wan, internet or RATE\\+LATENCY"):
        N.parse_profile("fast")


def test_ring_all_reduce_cost_by_hand() -> None:
    # DDP on 4 workers, 10 steps, one all-reduce of 1 MB each: 6 messages per call, 1.5 MB on the wire.
    r = record(train=3.0, blocked=1.0, sent=15_000_000, recv=15_000_000, messages=60, collectives=10)
    t = N.worker_traffic(r, world_size=4, steps=10)
    assert (t.all_reduces, t.exchanges, t.compute_s) == (10, 0, 2.0)
    net = N.NetworkProfile("x", 100e6, 0.05)
    # latency: 10 calls x 2(N-1)=6 hops x 2 one-way latencies x 50 ms = 6 s; bandwidth 15 MB * 8 / 100 Mbit/s = 1.2 s
    assert N.comm_seconds(t, world_size=4, network=net) == pytest.approx(6.0 + 1.2)
    # the measured training time (compute + waiting for others) plus the modelled communication
    assert N.modelled_seconds([t], world_size=4, network=net) == pytest.approx(3.0 + 7.2)


def test_pairwise_exchange_is_one_round_trip_and_eval_flags_are_removed() -> None:
    # NoLoCo, no overlap: 5 exchanges of 2 MB; plus 3 stop_at_target flag all-reduces at evaluations.
    flag = math.ceil(6 * 4 / 4)
    r = record(train=4.0, blocked=3.9, sent=10_000_000 + 3 * flag, recv=10_000_000 + 3 * flag, messages=5 + 18, collectives=3)
    t = N.worker_traffic(r, world_size=4, evals_with_flag=3, steps=30)
    assert (t.all_reduces, t.exchanges, t.bytes_sent) == (0, 5, 10_000_000)
    net = N.NetworkProfile("x", 1e9, 0.01)
    # 0.1 s of compute over 5 exchanges: the connection never idles past the RTO, the window stays open
    assert N.comm_seconds(t, world_size=4, network=net) == pytest.approx(5 * 2 * 0.01 + 0.08)


def test_cold_window_by_hand() -> None:
    # 2 MB at 1 Gbit/s, RTT 20 ms, MTU 1500: windows of 10, 20, ..., 640 segments of 1448 B (7 rounds,
    # 127 * 14480 B) each take one RTT; the last 2e6 - 1838960 B fit in the 8th window.
    net = N.NetworkProfile("x", 1e9, 0.01)
    sent = 127 * 14480
    want = 7 * 0.02 + (2e6 - sent) / 1.25e8 - 2e6 / 1.25e8
    assert N.slow_start_extra_s(2e6, net) == pytest.approx(want)
    assert N.slow_start_extra_s(14480, net) == 0.0  # fits the initial window
    # jumbo frames (the WAN harness) start 6x wider: fewer rounds
    assert N.slow_start_extra_s(2e6, N.NetworkProfile("j", 1e9, 0.01, mtu=9000)) < want
    # an idle connection pays it: the same exchanges with 3.5 s of compute between them
    r = record(train=4.0, blocked=0.5, sent=10_000_000, recv=10_000_000, messages=5, collectives=0)
    t = N.worker_traffic(r, world_size=4, steps=30)
    assert N.comm_seconds(t, world_size=4, network=net) == pytest.approx(5 * (2 * 0.01 + want) + 0.08)


def test_overlapped_exchange_costs_only_what_sticks_out() -> None:
    # Half the exchanges (phi) overlap 10 steps of 0.1 s compute = 1 s each.
    r = record(train=10.0, blocked=0.0, sent=8_000_000, recv=8_000_000, messages=4, collectives=0)
    t = N.worker_traffic(r, world_size=2, steps=100, overlapped_share=0.5, overlap_steps=10)
    slow = N.NetworkProfile("slow", 10e6, 0.1)
    wire = 8_000_000 * 8 / 10e6  # 6.4 s in all, 1.6 s per exchange; a phi exchange needs 0.2 + 1.6 s, 1 s of it hides
    per_phi = 2 * 0.1 + wire / 4
    start = N.slow_start_extra_s(2_000_000, slow)  # idle for 5 s between blocking calls: every window is cold
    per_phi += start
    want = 2 * (2 * 0.1 + start) + 2 * (2 * 0.1 + start) + wire - 2 * min(per_phi, 1.0)
    assert N.comm_seconds(t, world_size=2, network=slow) == pytest.approx(want)
    fast = N.NetworkProfile("fast", 1e9, 0.001)  # everything hides: only the blocking Δ exchanges cost
    t_fast = N.comm_seconds(t, world_size=2, network=fast)
    assert t_fast == pytest.approx(2 * (2 * 0.001 + N.slow_start_extra_s(2_000_000, fast)) + 8_000_000 * 8 / 1e9 / 2)


def test_counters_that_do_not_fit_are_a_one_line_error() -> None:
    r = record(train=1.0, blocked=0.0, sent=0, recv=0, messages=2, collectives=1)
    with pytest.raises(ValueError, match="do not fit all-reduces and exchanges on 4 workers"):
        N.worker_traffic(r, world_size=4, steps=1)


def test_quick_network_track_runs_and_scores_each_profile(tmp_path: Path) -> None:
    out = tmp_path / "track.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "network_track.py"), "--quick", "--root", str(tmp_path / "runs"),
           "--out", str(out), "--plot", str(tmp_path / "track.png")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "internet (100 Mbit/s + 100 ms)" in proc.stdout
    data = json.loads(out.read_text())
    assert set(data["scores"]) == {"datacenter", "wan", "internet"}
    assert set(data["scores"]["internet"]) == {"ddp_adamw", "diloco_adamw", "noloco_adamw"}
    assert (tmp_path / "track.png").stat().st_size > 0
    # Each trial ran once; the profiles only re-cost its traffic. DDP sends every step, so a slower
    # network must cost it more than it costs NoLoCo, which sends every H steps.
    t = data["times_s"]
    grow = {s: t["internet"][s]["digits_cnn"] / t["datacenter"][s]["digits_cnn"] for s in ("ddp_adamw", "noloco_adamw")
            if t["internet"][s]["digits_cnn"] and t["datacenter"][s]["digits_cnn"]}
    assert grow.get("noloco_adamw") and grow["ddp_adamw"] > grow["noloco_adamw"] > 1.0
    run = N.load_trial_run(Path(next(r["out_dir"] for r in data["trials"] if r["submission"] == "ddp_adamw")))
    assert run.target_step is not None and all(tr.exchanges == 0 and tr.all_reduces == run.steps_done for tr in run.traffic)
