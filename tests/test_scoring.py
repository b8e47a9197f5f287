"""AlgoPerf scoring on small hand-computed tables, and the harness's bookkeeping (no training)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from dtrain.scoring import profiles as P

INF = math.inf


def test_taus_match_linspace() -> None:
    grid = P.taus()
    assert len(grid) == 100 and grid[0] == 1.0 and grid[-1] == 4.0
    assert grid[1] == pytest.approx(1 + 3 / 99)


def test_trial_time_reads_summary() -> None:
    assert P.trial_time({"reached_target": True, "time_to_target_s": 12.5}) == 12.5
    assert P.trial_time({"reached_target": False, "time_to_target_s": None}) == INF
    assert P.trial_time({"reached_target": True, "time_to_target_s": None}) == INF
    # reached, but only after the workload's time budget: a miss
    assert P.trial_time({"reached_target": True, "time_to_target_s": 70.0}, budget_s=60.0) == INF
    assert P.trial_time({"reached_target": True, "time_to_target_s": 60.0}, budget_s=60.0) == 60.0


def test_single_submission_scores_one() -> None:
    s = P.score_submissions({"a": {"w1": [10.0, 12.0], "w2": [3.0]}})
    assert s.ratios == {"a": {"w1": 1.0, "w2": 1.0}}
    assert s.scores["a"] == pytest.approx(1.0)
    assert all(v == 1.0 for v in s.profiles["a"])


def test_best_trial_is_the_fastest_and_misses_are_ignored() -> None:
    s = P.score_submissions({"a": {"w": [INF, 9.0, 7.0]}, "b": {"w": [14.0, INF]}})
    assert s.best == {"a": {"w": 7.0}, "b": {"w": 14.0}}
    assert s.ratios == {"a": {"w": 1.0}, "b": {"w": 2.0}}


def test_missed_target_scores_zero_on_that_workload() -> None:
    # b reaches w1 (ratio 1) but never w2: its profile is 1/2 everywhere, score 0.5.
    s = P.score_submissions({"a": {"w1": [20.0], "w2": [5.0]}, "b": {"w1": [10.0], "w2": [INF, INF]}})
    assert s.ratios["b"] == {"w1": 1.0, "w2": INF}
    assert s.ratios["a"] == {"w1": 2.0, "w2": 1.0}
    assert all(v == 0.5 for v in s.profiles["b"])
    assert s.scores["b"] == pytest.approx(0.5)


def test_workload_nobody_reaches_counts_against_everyone() -> None:
    s = P.score_submissions({"a": {"w1": [1.0], "w2": [INF]}, "b": {"w1": [1.0], "w2": [INF]}})
    assert s.fastest["w2"] == INF
    assert s.scores == {"a": pytest.approx(0.5), "b": pytest.approx(0.5)}


def test_submission_without_trials_on_a_workload_misses_it() -> None:
    s = P.score_submissions({"a": {"w1": [1.0], "w2": [2.0]}, "b": {"w1": [1.0]}}, workloads=["w1", "w2"])
    assert s.ratios["b"]["w2"] == INF and s.scores["b"] == pytest.approx(0.5)


def test_ties_share_ratio_one() -> None:
    s = P.score_submissions({"a": {"w": [5.0]}, "b": {"w": [5.0, 6.0]}, "c": {"w": [10.0]}})
    assert s.ratios["a"]["w"] == s.ratios["b"]["w"] == 1.0
    assert s.scores["a"] == s.scores["b"] == pytest.approx(1.0)
    assert s.ratios["c"]["w"] == 2.0


def test_four_x_rule() -> None:
    # 4.0x the best is still inside (r <= 4); 4.01x counts as not reached.
    s = P.score_submissions({"a": {"w": [10.0]}, "b": {"w": [40.0]}, "c": {"w": [40.1]}})
    assert s.times["b"]["w"] == 40.0 and s.ratios["b"]["w"] == 4.0
    assert s.best["c"]["w"] == 40.1 and s.times["c"]["w"] == INF and s.ratios["c"]["w"] == INF
    # b counts only at the last grid point: area of the last trapezoid, (0 + 1) / 2 * (3 / 99), over 3
    assert s.profiles["b"][-1] == 1.0 and sum(s.profiles["b"]) == 1.0
    assert s.scores["b"] == pytest.approx(0.5 / 99)
    assert s.scores["c"] == 0.0


def test_exact_area_for_a_known_profile() -> None:
    # Two workloads, ratios 1 and 2.5: rho = 1/2 on [1, 2.5), 1 on [2.5, 4].
    # 2.5 lies exactly halfway between grid points 49 and 50, so the trapezoid rule is exact:
    # area = 0.5 * 1.5 + 1 * 1.5 = 2.25, score = 2.25 / 3 = 0.75.
    s = P.score_submissions({"a": {"w1": [4.0], "w2": [10.0]}, "b": {"w1": [8.0], "w2": [4.0]}})
    assert s.ratios["a"] == {"w1": 1.0, "w2": 2.5}
    assert s.scores["a"] == pytest.approx(0.75, abs=1e-12)
    # b: ratios 2 and 1. 2.0 is grid point 33 (1 + 33 * 3/99), so rho jumps there; by hand:
    # 32 segments at 1/2, one segment (32, 33) at (1/2 + 1)/2, 66 segments at 1, each 3/99 wide.
    h = 3 / 99
    expected = (32 * 0.5 + 0.75 + 66 * 1.0) * h / 3
    assert s.scores["b"] == pytest.approx(expected, abs=1e-12)
    assert expected == pytest.approx(82.75 / 99)


def test_profile_counts_ratio_on_grid_point() -> None:
    grid = P.taus()
    assert P.profile([grid[33]], grid)[33] == 1.0
    assert P.profile([2.0], grid)[33] == 1.0  # float noise in the grid does not drop it


def test_score_is_monotone_in_speed() -> None:
    base = {"a": {"w1": [10.0], "w2": [10.0]}}
    fast = P.score_submissions({**base, "b": {"w1": [12.0], "w2": [12.0]}}).scores["b"]
    slow = P.score_submissions({**base, "b": {"w1": [25.0], "w2": [25.0]}}).scores["b"]
    assert 0 < slow < fast < 1


def test_results_from_run_directories(tmp_path: Path) -> None:
    from dtrain.scoring.runner import collect_trials

    def write(sub: str, wl: str, trial: int, summary: dict) -> None:
        d = tmp_path / sub / wl / f"trial-{trial}"
        d.mkdir(parents=True)
        (d / "summary.json").write_text(json.dumps({"workload": wl, **summary}))

    write("x", "w1", 0, {"reached_target": True, "time_to_target_s": 3.0})
    write("x", "w1", 1, {"reached_target": True, "time_to_target_s": 2.0})
    write("y", "w1", 0, {"reached_target": False, "time_to_target_s": None})
    (tmp_path / "y" / "w1" / "trial-1").mkdir()  # interrupted: no summary, ignored
    trials = collect_trials(tmp_path)
    assert trials == {"x": {"w1": [3.0, 2.0]}, "y": {"w1": [INF]}}


def test_score_command_runs_resumes_and_reports(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Two tiny submissions on digits_cnn, in-process: table, JSON, plot; a rerun runs nothing."""
    from dtrain.scoring.cli import main

    subs = tmp_path / "subs"
    subs.mkdir()
    (subs / "fast.yaml").write_text("optim:\n  name: adamw\n  lr: 0.01\n  warmup_steps: 0\n")
    (subs / "broken.yaml").write_text("optim:\n  name: adamw\n  lr: -1.0\n")  # rejected by config validation
    out = tmp_path / "study"
    argv = [str(subs), "--workloads", "digits_cnn", "--trials", "1", "--out", str(out), "--in-process",
            "--set", "steps=60", "--set", "eval_every=20", "--set", "workload.target=0.6",
            "--set", "workload.channels=8", "--set", "workload.hidden=32"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "fast" in text and "broken" in text and "score" in text
    data = json.loads((out / "scores.json").read_text())
    assert data["submissions"]["fast"]["score"] == pytest.approx(1.0)
    assert data["submissions"]["broken"]["score"] == 0.0
    broken = json.loads((out / "broken" / "digits_cnn" / "trial-0" / "summary.json").read_text())
    assert broken["failed"] and "optim.lr" in broken["error"]
    assert (out / "profiles.png").stat().st_size > 0
    first = (out / "fast" / "digits_cnn" / "trial-0" / "summary.json").stat().st_mtime_ns
    assert main(argv) == 0  # resume: every trial has a summary.json, nothing runs again
    assert "2 of 2 trials already finished" in capsys.readouterr().out
    assert (out / "fast" / "digits_cnn" / "trial-0" / "summary.json").stat().st_mtime_ns == first
    assert main(["--runs", str(out), "--json", str(tmp_path / "again.json"), "--plot", str(tmp_path / "p.png")]) == 0
    again = json.loads((tmp_path / "again.json").read_text())
    assert again["submissions"]["fast"]["score"] == pytest.approx(1.0)


def test_unfinished_trial_is_rerun(tmp_path: Path) -> None:
    from dtrain.scoring.runner import plan

    sub = tmp_path / "s.yaml"
    sub.write_text("optim:\n  name: adamw\n")
    (trial,) = plan([sub], ["ctr"], trials=1, root=tmp_path / "study")
    assert not trial.finished
    Path(trial.out_dir).mkdir(parents=True)
    (Path(trial.out_dir) / "metrics.jsonl").write_text("{}\n")  # interrupted mid-run
    assert not trial.finished
    trial.summary_path.write_text("{}")
    assert trial.finished
