"""The network track: a trial's time to target = its compute time + modelled communication time.

A trial runs once (any backend; N workers); its backend counted what every worker sent
(summary.json ``workers[r]["comm"]``: bytes_sent, bytes_recv, messages, collectives, blocked_s).
Under a named network profile (bandwidth per link and direction, one-way latency) the same
traffic costs, per worker:

    ring all-reduce   2(N-1) hops in sequence
    pairwise exchange one hop
    a hop             one round trip, 2 one-way latencies: gloo sends a message only once the
                      receiver's ready notice has arrived, then the data crosses
    bandwidth         max(bytes sent, bytes received) * 8 / bandwidth   (links are full duplex)
    cold window       a connection idle longer than TCP's retransmission timeout (RTT + 200 ms,
                      Linux's floor) restarts from 10 segments (RFC 6928, RFC 5681 restart after
                      idle); the window then doubles once per RTT, so a message of b bytes takes
                      rounds of max(RTT, window / bandwidth) until the rest fits in one window.
                      A ring's connections idle for the compute between calls (a cold all-reduce
                      pays it on its first hop); an exchange's partner changes every round, so
                      its first message finds the connection idle for ~N-1 rounds, and one that
                      follows an overlapped message to the same partner, for the overlap window.
    compute           the worker's training seconds in the measured run (evaluation excluded)

and the trial's time is the slowest worker's compute + communication. Compute keeps the measured
run's blocked seconds: there they are waits for slower workers (a synchronous step is as slow as
its slowest worker) plus that run's own communication, which must be fast (threads of the local
backend, or an unshaped link) for the model to hold; overlap windows use compute net of blocking.

Calls are counted from the counters: every collective of a training loop is an all-reduce
(2(N-1) messages each), so exchanges = messages - 2(N-1) * collectives; the all-reduce that
`stop_at_target` runs at each evaluation (outside training time) is taken out. NoLoCo with
``phi_lead_steps != 0`` sends φ ahead of the outer step: half of its exchanges (and bytes) overlap
that many steps of compute and cost only what sticks out of them. Not modelled: congestion,
jitter, per-packet processing, compute slowed by the network. benchmarks/network_track.py checks
the model against measured runs over emulated links (launchers/wan.py).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HOP_LATENCIES = 2  # one-way latencies per hop: the receiver's ready notice, then the data
EVAL_FLAG_BYTES = 4  # train.py's stop_at_target all-reduce: one float32 per evaluation
INITIAL_WINDOW_SEGMENTS = 10  # RFC 6928
RTO_FLOOR_S = 0.2  # Linux TCP_RTO_MIN: the idle time that restarts the window is RTT + this
HEADER_BYTES = 52  # IPv4 + TCP with timestamps: segment size = MTU - 52


@dataclass(frozen=True)
class NetworkProfile:
    name: str
    bandwidth_bit_s: float  # per link and direction
    latency_s: float  # one way
    mtu: int = 1500  # the emulated links of launchers/wan.py use 9000

    def __post_init__(self) -> None:
        if not (self.bandwidth_bit_s > 0 and math.isfinite(self.bandwidth_bit_s)):
            raise ValueError(f"network {self.name}: bandwidth must be a positive number of bit/s, got {self.bandwidth_bit_s}")
        if not (self.latency_s >= 0 and math.isfinite(self.latency_s)):
            raise ValueError(f"network {self.name}: latency must be >= 0 seconds, got {self.latency_s}")
        if self.mtu <= HEADER_BYTES:
            raise ValueError(f"network {self.name}: mtu must exceed {HEADER_BYTES} bytes, got {self.mtu}")

    def describe(self) -> str:
        lat = f"{self.latency_s * 1e6:g} µs" if self.latency_s < 1e-3 else f"{self.latency_s * 1e3:g} ms"
        return f"{_rate(self.bandwidth_bit_s)} + {lat}"


PROFILES: dict[str, NetworkProfile] = {
    "datacenter": NetworkProfile("datacenter", 100e9, 5e-6),
    "wan": NetworkProfile("wan", 1e9, 50e-3),
    "internet": NetworkProfile("internet", 100e6, 100e-3),
}
_UNITS = {"kbit": 1e3, "mbit": 1e6, "gbit": 1e9}


def _rate(bit_s: float) -> str:
    for unit, scale in (("Gbit/s", 1e9), ("Mbit/s", 1e6), ("kbit/s", 1e3)):
        if bit_s >= scale:
            return f"{bit_s / scale:g} {unit}"
    return f"{bit_s:g} bit/s"


def parse_profile(spec: str) -> NetworkProfile:
    """A named profile (datacenter, wan, internet) or ``<rate>+<latency>ms`` such as ``100mbit+50ms``."""
    if spec in PROFILES:
        return PROFILES[spec]
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(kbit|mbit|gbit)\+(\d+(?:\.\d+)?)ms", spec.strip().lower())
    if not m:
        raise ValueError(f"unknown network {spec!r}: use {', '.join(PROFILES)} or RATE+LATENCY such as 100mbit+50ms")
    return NetworkProfile(spec, float(m[1]) * _UNITS[m[2]], float(m[3]) / 1e3)


@dataclass(frozen=True)
class Traffic:
    """One worker's training traffic, by kind of call, and its compute seconds."""

    all_reduces: int
    exchanges: int
    bytes_sent: float
    bytes_recv: float
    compute_s: float  # training seconds net of blocked seconds: what an overlapped call can hide behind
    steps: int
    overlapped_share: float = 0.0  # fraction of exchanges (and bytes) that overlap compute
    overlap_steps: int = 0  # steps of compute each overlapped exchange hides behind
    train_s: float = 0.0  # training seconds as measured (compute + waits for slower workers)


def worker_traffic(record: Mapping[str, Any], *, world_size: int, evals_with_flag: int = 0, steps: int,
                   overlapped_share: float = 0.0, overlap_steps: int = 0) -> Traffic:
    """Split one worker's counters into all-reduces and exchanges (see the module docstring)."""
    c = record["comm"]
    hops = 2 * (world_size - 1)
    ring_flag = math.ceil(hops * EVAL_FLAG_BYTES / world_size) if world_size > 1 else 0
    collectives = int(c["collectives"]) - evals_with_flag
    messages = int(c["messages"]) - hops * evals_with_flag
    exchanges = messages - hops * collectives
    if collectives < 0 or exchanges < 0:
        raise ValueError(f"rank {record.get('rank')}: counters ({c['collectives']} collectives, {c['messages']} messages) "
                         f"do not fit all-reduces and exchanges on {world_size} workers; is world_size right?")
    compute = float(record["train_time_s"]) - float(c["blocked_s"])
    return Traffic(all_reduces=collectives, exchanges=exchanges, bytes_sent=float(c["bytes_sent"]) - ring_flag * evals_with_flag,
                   bytes_recv=float(c["bytes_recv"]) - ring_flag * evals_with_flag, compute_s=max(compute, 0.0), steps=steps,
                   overlapped_share=overlapped_share if exchanges else 0.0, overlap_steps=overlap_steps,
                   train_s=float(record["train_time_s"]))


def slow_start_extra_s(nbytes: float, network: NetworkProfile) -> float:
    """Seconds a restarted (cold) TCP window adds to sending ``nbytes``, beyond nbytes / bandwidth."""
    rtt, byte_s = 2 * network.latency_s, network.bandwidth_bit_s / 8
    window = INITIAL_WINDOW_SEGMENTS * (network.mtu - HEADER_BYTES)
    left, t = float(nbytes), 0.0
    while left > window:
        t += max(rtt, window / byte_s)
        left -= window
        window *= 2
    return max(0.0, t + left / byte_s - nbytes / byte_s)


def comm_seconds(t: Traffic, *, world_size: int, network: NetworkProfile) -> float:
    """Modelled seconds this worker spends blocked on communication under ``network``."""
    lat, bw = network.latency_s, network.bandwidth_bit_s
    hops = t.all_reduces * 2 * (world_size - 1)
    ring = hops * HOP_LATENCIES * lat
    wire_s = max(t.bytes_sent, t.bytes_recv) * 8 / bw
    blocking_x = t.exchanges * (1 - t.overlapped_share)
    message = max(t.bytes_sent, t.bytes_recv) / max(hops + t.exchanges, 1)  # bytes per hop or exchange, if even
    timeout = 2 * lat + RTO_FLOOR_S
    cold_s = slow_start_extra_s(message, network)
    # A ring talks to the same neighbours every call: idle for the compute between calls.
    ring += t.all_reduces * (cold_s if t.compute_s / max(t.all_reduces, 1) > timeout else 0.0)
    # An exchange's partner is drawn afresh each round from N - 1 peers, so the first message of a
    # round finds its connection idle for about N - 1 rounds; a message sent after an overlapped one
    # to the same partner has been idle for the overlap window.
    rounds = max(blocking_x, 1)
    first_cold = cold_s if (world_size - 1) * t.compute_s / rounds > timeout else 0.0
    window = t.overlap_steps * t.compute_s / max(t.steps, 1)
    start_s = first_cold if not t.overlapped_share else (cold_s if window > timeout else 0.0)
    xchg = blocking_x * (HOP_LATENCIES * lat + start_s)
    if t.exchanges and t.all_reduces:  # mixed traffic: bytes cannot be split by kind, so none is overlapped
        return ring + xchg + t.exchanges * t.overlapped_share * (HOP_LATENCIES * lat + first_cold) + wire_s
    hidden = 0.0
    overlapped = t.exchanges * t.overlapped_share
    if overlapped:
        per_call = HOP_LATENCIES * lat + first_cold + wire_s * t.overlapped_share / overlapped
        hidden = overlapped * min(per_call, window)
    return ring + xchg + overlapped * (HOP_LATENCIES * lat + first_cold) + wire_s - hidden


def run_traffic(summary: Mapping[str, Any], config: Mapping[str, Any] | None = None, *,
                steps_done: int | None = None) -> list[Traffic]:
    """Every worker's Traffic from a run's summary.json (and its config: eval and overlap settings)."""
    cfg = config or {}
    world = int(summary["world_size"])
    steps = int(steps_done if steps_done is not None else summary["steps"])
    eval_every = int(cfg.get("eval_every") or 0)
    flags = steps // eval_every if cfg.get("stop_at_target") and eval_every else 0
    algo = cfg.get("algo") or {}
    share, lead = 0.0, 0
    if algo.get("name") == "noloco" and int(algo.get("phi_lead_steps", -1)) != 0:
        h = int(algo.get("sync_every", 50))
        share, lead = 0.5, h if int(algo.get("phi_lead_steps", -1)) == -1 else min(int(algo["phi_lead_steps"]), h)
    return [worker_traffic(r, world_size=world, evals_with_flag=flags, steps=steps, overlapped_share=share, overlap_steps=lead)
            for r in summary["workers"]]


def modelled_seconds(traffic: list[Traffic], *, world_size: int, network: NetworkProfile) -> float:
    """The slowest worker's measured training time + modelled communication: the run's modelled training time."""
    return max(t.train_s + comm_seconds(t, world_size=world_size, network=network) for t in traffic)


@dataclass(frozen=True)
class TrialRun:
    """What the network track needs from one finished trial."""

    traffic: list[Traffic]
    world_size: int
    steps_done: int
    target_step: int | None  # first evaluated step at which rank 0 met the target

    def time_to_target(self, network: NetworkProfile) -> float:
        """Modelled training seconds to the target (inf if missed); costs accrue evenly over steps."""
        if self.target_step is None or self.steps_done <= 0:
            return math.inf
        return modelled_seconds(self.traffic, world_size=self.world_size, network=network) * self.target_step / self.steps_done


def load_trial_run(out_dir: str | Path) -> TrialRun:
    """A TrialRun from a trial folder (summary.json, config.yaml, metrics.jsonl as `dtrain train` writes them)."""
    out = Path(out_dir)
    summary = json.loads((out / "summary.json").read_text())
    if summary.get("failed") or "workers" not in summary:
        return TrialRun([], int(summary.get("world_size", 1)), 0, None)
    config: dict[str, Any] = {}
    if (out / "config.yaml").is_file():
        from omegaconf import OmegaConf

        config = OmegaConf.to_container(OmegaConf.load(out / "config.yaml"), resolve=True)  # type: ignore[assignment]
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    steps_done = max((int(r["step"]) for r in rows), default=0)
    ev = summary["eval"]
    target_step = None
    if summary.get("reached_target"):
        for r in rows:
            v = r.get("eval")
            if v is not None and r["step"] > 0 and (v >= ev["target"] if ev["higher_is_better"] else v <= ev["target"]):
                target_step = int(r["step"])
                break
    traffic = run_traffic(summary, config, steps_done=steps_done)
    return TrialRun(traffic, int(summary["world_size"]), steps_done, target_step)
