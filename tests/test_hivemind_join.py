"""A peer joining a NoLoCo run on hivemind mid-run: live state, in step at once, nobody waits on it."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

pytest.importorskip("hivemind")

from dtrain.testing import peers  # noqa: E402

SYNC_EVERY = 10
STEPS = 400
ARGS = [
    "configs/noloco.yaml", "workload.name=char_lm", "workload.n_layer=1", "workload.d_model=32", "workload.n_head=2",
    "workload.seq_len=32", "workload.batch_size=8", "workload.eval_batches=2", f"steps={STEPS}", f"eval_every={STEPS}",
    "ckpt_every=0", "log_every=10", "progress=false", "plot=false", "threads=1", f"algo.sync_every={SYNC_EVERY}",
    "algo.timeout_s=60", "comm.name=hivemind", "comm.run_id=join", "comm.request_timeout=2", "comm.matchmaking_time=60",
    "comm.heartbeat=0.5",
]


def logs(workdir: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(workdir.glob("peer*.log")))


def logged_step(metrics: Path) -> int:
    if not metrics.exists():
        return 0
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return max((r["step"] for r in rows if "loss" in r), default=0)


@pytest.mark.timeout(420)
def test_a_peer_joining_noloco_mid_run_is_in_step_within_a_round_and_nobody_waits(tmp_path):
    # Two peers, slowed (0.5 s per exchange, two exchanges a round) so the run outlasts the
    # joiner's start-up; the third starts once they are 20 steps in, with an empty out_dir.
    out = tmp_path / "out"
    slow = ["--delay-s", "0.5"]
    procs, addr = peers.start_run(2, [*ARGS, f"out_dir={out}", "comm.min_peers=2"], tmp_path, faults={0: slow, 1: slow})
    joiner = None
    try:
        while logged_step(out / "metrics.jsonl") < 20 and procs[0].poll() is None:
            time.sleep(0.2)
        joiner = peers.start_peer([*ARGS, f"out_dir={tmp_path / 'joiner'}"], log_path=tmp_path / "peer2.log",
                                  initial_peers=[addr])
        codes = peers.wait([*procs, joiner], timeout=360)
        assert codes == [0, 0, 0], logs(tmp_path)
    finally:
        peers.stop([*procs, *([joiner] if joiner else [])])
    text = (tmp_path / "peer2.log").read_text()
    found = re.search(r"rank (\d+) joins run 'join' at step (\d+) from rank \d+ \(paired from round (\d+)\)", text)
    assert found, logs(tmp_path)
    rank, at, first = (int(g) for g in found.groups())
    assert 20 <= at < STEPS and rank == 2
    # Live state, not a checkpoint (there are none): it starts where its server was, and is
    # paired from the round after next at the latest.
    assert at // SYNC_EVERY + 1 <= first <= at // SYNC_EVERY + 3, (at, first)
    summary = json.loads((out / "summary.json").read_text())
    workers = {w["rank"]: w for w in summary["workers"]}
    assert sorted(workers) == [0, 1, 2] and workers[2]["steps"] == STEPS
    for r, w in workers.items():  # no round after the join (nor before) waited out a timeout
        algo = w["algorithm"]
        assert algo["member_failures"] == 0 and algo["abandoned_exchanges"] == 0, (r, algo, logs(tmp_path))
    groups = {r: dict((g[0], g[1]) for g in w["algorithm"]["groups"]) for r, w in workers.items()}
    last = STEPS // SYNC_EVERY
    for round_ in range(first, last + 1):  # the joiner meets the others in the same rounds, from its first on
        assert groups[0][round_] == groups[1][round_] == groups[2][round_] == [0, 1, 2], (round_, groups)
    for round_ in range(at // SYNC_EVERY + 1, first):  # before it: the survivors pair alone, the joiner is solo
        assert groups[0][round_] == [0, 1] and groups[2][round_] == [2], (round_, groups)
    value = summary["eval"]["value"]
    assert value < summary["eval"]["initial"] - 1.0
