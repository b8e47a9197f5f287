"""Real hivemind peers (separate processes on loopback) training with `dtrain train comm=hivemind`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("hivemind")

from dtrain.config import load  # noqa: E402
from dtrain.testing import peers  # noqa: E402
from dtrain.train import run  # noqa: E402

TINY = [
    "workload.name=char_lm", "workload.n_layer=1", "workload.d_model=32", "workload.n_head=2", "workload.seq_len=32",
    "workload.batch_size=8", "workload.eval_batches=2", "steps=60", "eval_every=60", "ckpt_every=10",
    "progress=false", "plot=false", "threads=1", "resume=true",
]
ALGO = {
    "diloco": ["configs/diloco.yaml", *TINY, "algo.sync_every=10"],
    "noloco": ["configs/noloco.yaml", *TINY, "algo.sync_every=10"],
    "spsa": ["configs/spsa.yaml", *TINY, "steps=30", "eval_every=30", "algo.check_every=10", "optim.lr=1e-3"],
}


def hivemind_args(algo: str, out: Path, run_id: str, n: int, *, heartbeat: float = 0.5) -> list[str]:
    return [*ALGO[algo], f"out_dir={out}", "comm.name=hivemind", f"comm.run_id={run_id}", f"comm.min_peers={n}",
            "comm.request_timeout=2", "comm.matchmaking_time=90", f"comm.heartbeat={heartbeat}"]


def local_reference(algo: str, out: Path, n: int) -> dict:
    torch.set_num_threads(1)
    cfg = ALGO[algo]
    return run(load(cfg[0], [*cfg[1:], f"out_dir={out}", "comm.name=local", f"comm.workers={n}"]))


def logs(workdir: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-2500:]}" for p in sorted(workdir.glob("peer*.log")))


def summary(workdir: Path) -> dict:
    return json.loads((workdir / "out" / "summary.json").read_text())


@pytest.mark.timeout(300)
def test_noloco_and_spsa_match_the_local_backend_and_survive_a_killed_peer(tmp_path):
    # Three runs of three peers at once (they mostly wait on start-up, so they share it):
    # - noloco, spsa: healthy. Exchanges are exact, gathers are bytes and the gossip schedule
    #   comes from peers(), so they must reproduce the local backend (same math as torch's).
    # - kill: noloco whose rank 2 SIGKILLs itself at its 6th call (init broadcast, resume
    #   agreement, then exchanges): mid-run. Ranks 0 and 1 go on and report without it.
    # The healthy runs beat every second (records live 4 s): nine peers share two cores here, and a
    # peer whose record lapsed would leave the gossip schedule, so the run would rightly differ.
    runs = {}
    for name, algo, faults in (("noloco", "noloco", None), ("spsa", "spsa", None), ("kill", "noloco", {2: ["--kill-at-call", "6"]})):
        work = tmp_path / name
        work.mkdir()
        args = hivemind_args(algo, work / "out", name, 3, heartbeat=0.5 if faults else 1.0)
        runs[name] = (work, peers.start_run(3, args, work, faults=faults)[0])
    everyone = [p for _, procs in runs.values() for p in procs]
    try:
        for name, (work, procs) in runs.items():
            expected = [0, 0, -9] if name == "kill" else [0, 0, 0]
            assert peers.wait(procs, timeout=240) == expected, logs(work)
        assert peers.stray_daemons(everyone) == [], "p2pd outlived its peer (the killed one included)"
    finally:
        peers.stop(everyone)
    refs = {algo: local_reference(algo, tmp_path / f"local_{algo}", 3) for algo in ("noloco", "spsa")}
    for algo in ("noloco", "spsa"):
        got, ref = summary(runs[algo][0]), refs[algo]
        assert got["world_size"] == 3 and got["workers_reporting"] == 3
        if algo == "noloco":  # equal numbers need equal schedules: every round met all three
            reports = {w["rank"]: (w["algorithm"]["member_failures"], w["algorithm"]["groups"]) for w in got["workers"]}
            full = all(fails == 0 and all(g == [0, 1, 2] for _, g in groups) for fails, groups in reports.values())
            assert full, f"{reports}\n{logs(runs[algo][0])}"
        assert got["final_loss"] == pytest.approx(ref["final_loss"], rel=1e-5), algo
        assert got["eval"]["value"] == pytest.approx(ref["eval"]["value"], rel=1e-5), algo
        assert got["eval"]["value"] < got["eval"]["initial"], algo
        if algo == "spsa":  # one byte per worker per step on the wire, as with torch
            assert got["comm"]["max"]["payload_bytes"] == ref["comm"]["max"]["payload_bytes"]
    hurt = summary(runs["kill"][0])
    assert hurt["world_size"] == 3 and hurt["workers_reporting"] == 2
    assert sorted(w["rank"] for w in hurt["workers"]) == [0, 1]
    assert abs(hurt["eval"]["value"] - refs["noloco"]["eval"]["value"]) < 0.25  # same loss range as the full run
    assert hurt["eval"]["value"] < hurt["eval"]["initial"] - 1.0


def final_eval_of(out: Path, rank: int, steps: int, train_args: list[str]) -> float:
    """Evaluate a peer's last checkpoint (a non-zero rank writes no summary of its own)."""
    from dtrain import checkpoint
    from dtrain.config import section_module

    cfg = load(train_args[0], [a for a in train_args[1:] if not a.startswith("comm.")])
    workload = section_module("workload", cfg.workload.name).build(cfg.workload, seed=cfg.seed)
    model = workload.build_model()
    model.load_state_dict(checkpoint.load(out, rank, steps)["model"])
    return workload.evaluate(model)[workload.metric]


@pytest.mark.timeout(420)
def test_bad_peer_is_dropped_and_a_late_peer_joins(tmp_path):
    # Ranks 0 and 1 are slowed (2.5 s per collective) so the run lasts long enough to be joined;
    # rank 2 sends NaNs from its 3rd collective (its first sync) on; a 4th peer joins mid-run.
    steps = 100
    args = [*hivemind_args("diloco", tmp_path / "out", "join", 3), f"steps={steps}", f"eval_every={steps}"]
    slow = ["--delay-s", "2.5"]
    procs, addr = peers.start_run(3, args, tmp_path, faults={0: slow, 1: slow, 2: ["--corrupt", "nan", "--corrupt-from", "3"]})
    joiner = None
    try:
        first_ckpt = tmp_path / "out" / "checkpoints" / "rank0" / "step_00000010.pt"  # the run is under way
        while not first_ckpt.exists() and procs[0].poll() is None:
            peers.time.sleep(0.2)
        join_out = tmp_path / "joiner_out"
        joiner_args = [a for a in args if not a.startswith(("out_dir=", "comm.min_peers"))] + [f"out_dir={join_out}"]
        joiner = peers.start_peer(joiner_args, log_path=tmp_path / "peer3.log", initial_peers=[addr])
        codes = peers.wait([*procs, joiner], timeout=360)
        assert codes[0] == 0 and codes[1] == 0, logs(tmp_path)
        assert codes[2] == 1, logs(tmp_path)  # the NaN sender is refused and stops
        assert "dropped by the leader" in (tmp_path / "peer2.log").read_text()
        assert codes[3] == 0, logs(tmp_path)
        assert peers.stray_daemons([*procs, joiner]) == [], "p2pd outlived its peer"
    finally:
        peers.stop([*procs, *([joiner] if joiner else [])])
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    log3 = (tmp_path / "peer3.log").read_text()
    assert "joins run 'join' at step" in log3, log3
    joined_at = int(log3.split("joins run 'join' at step ")[1].split()[0])
    joiner_rank = int(log3.split("hivemind: rank ")[1].split()[0])
    # The NaN sender is not among the reporters (the joiner may reuse its rank once it has left).
    assert sorted(w["rank"] for w in summary["workers"]) == sorted({0, 1, joiner_rank})
    value = summary["eval"]["value"]
    assert value == value and value < summary["eval"]["initial"] - 1.0  # finite: no NaN reached the weights
    assert 10 <= joined_at < steps
    at_end = final_eval_of(join_out, joiner_rank, steps, args)
    # It ends near the others (it lags them by its start-up, so it is not identical).
    assert abs(at_end - value) < 0.5
