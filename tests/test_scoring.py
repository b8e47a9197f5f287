"""AlgoPerf v0.6 scoring on hand-computed tables, against an independent re-implementation of the
reference's rules on random tables, and the harness's bookkeeping (no training)."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest

from dtrain.scoring import profiles as P

INF = math.inf
GRID = np.linspace(1.0, 4.0, 100)


def one(trials: dict) -> dict:
    """submission -> workload -> [trial times] as a single study."""
    return P.single_study(trials)


def test_taus_are_numpy_linspace_bit_for_bit() -> None:
    assert P.taus() == GRID.tolist()  # float noise differs from 1 + 3i/99 at 10 of the 100 points
    assert P.taus()[11] != 1 + 3 * 11 / 99


def test_trial_time_reads_summary() -> None:
    assert P.trial_time({"reached_target": True, "time_to_target_s": 12.5}) == 12.5
    assert P.trial_time({"reached_target": False, "time_to_target_s": None}) == INF
    assert P.trial_time({"reached_target": True, "time_to_target_s": None}) == INF
    # reached, but only after the workload's time budget: a miss
    assert P.trial_time({"reached_target": True, "time_to_target_s": 70.0}, budget_s=60.0) == INF
    assert P.trial_time({"reached_target": True, "time_to_target_s": 60.0}, budget_s=60.0) == 60.0


def test_single_submission_scores_one() -> None:
    s = P.score_submissions(one({"a": {"w1": [10.0, 12.0], "w2": [3.0]}}))
    assert s.ratios == {"a": {"w1": 1.0, "w2": 1.0}}
    assert s.scores["a"] == pytest.approx(1.0, abs=1e-12)
    assert all(v == 1.0 for v in s.profiles["a"])


def test_study_best_is_the_fastest_trial_and_misses_are_ignored() -> None:
    s = P.score_submissions(one({"a": {"w": [INF, 9.0, 7.0]}, "b": {"w": [14.0, INF]}}))
    assert s.per_workload == {"a": {"w": 7.0}, "b": {"w": 14.0}}
    assert s.ratios == {"a": {"w": 1.0}, "b": {"w": 2.0}}


def test_median_over_studies_of_study_bests_even_count() -> None:
    # Four studies: bests 3, 8, 20, 10 -> sorted 3, 8, 10, 20 -> median (8 + 10) / 2 = 9 (numpy's).
    studies = [[5.0, 3.0], [8.0], [INF, 20.0], [10.0, 12.0]]
    s = P.score_submissions({"a": {"w": studies}, "b": {"w": [[4.5], [4.5]]}})
    assert s.study_bests["a"]["w"] == [3.0, 8.0, 20.0, 10.0]
    assert s.per_workload["a"]["w"] == 9.0 and s.ratios["a"]["w"] == 2.0
    # The best trial overall (3.0) would have beaten b; only the old rule, by request, says so.
    old = P.score_submissions({"a": {"w": studies}, "b": {"w": [[4.5], [4.5]]}}, ruleset="best_trial")
    assert old.per_workload["a"]["w"] == 3.0 and old.ratios["b"]["w"] == 1.5
    # A study that missed takes part in the median: two studies, one inf -> (x + inf) / 2 = inf.
    assert P.per_workload_time([[1.0], [INF]]) == INF
    assert P.per_workload_time([[1.0], [INF], [2.0]]) == 2.0
    assert P.per_workload_time([]) == INF


def test_self_tuning_budget_is_one_and_a_half_times(tmp_path: Path) -> None:
    from dtrain.scoring.runner import read_result

    d = tmp_path / "s" / "w" / "study-1" / "trial-0"
    d.mkdir(parents=True)
    (d / "summary.json").write_text(json.dumps({"workload": "w", "reached_target": True, "time_to_target_s": 80.0}))
    (d / "trial.json").write_text(json.dumps({"submission": "s", "time_budget_s": 60.0}))
    r = read_result(d / "summary.json")
    assert r.study == 1 and r.submission == "s"
    assert r.time_under("external") == INF and r.time_s == INF
    assert r.time_under("self") == 80.0  # 80 <= 1.5 * 60
    (d / "summary.json").write_text(json.dumps({"workload": "w", "reached_target": True, "time_to_target_s": 90.5}))
    assert read_result(d / "summary.json").time_under("self") == INF


def test_missed_target_scores_zero_on_that_workload() -> None:
    # b reaches w1 (ratio 1) but never w2: its profile is 1/2 everywhere, score 0.5.
    s = P.score_submissions(one({"a": {"w1": [20.0], "w2": [5.0]}, "b": {"w1": [10.0], "w2": [INF, INF]}}))
    assert s.ratios["b"] == {"w1": 1.0, "w2": INF}
    assert s.ratios["a"] == {"w1": 2.0, "w2": 1.0}
    assert all(v == 0.5 for v in s.profiles["b"])
    assert s.scores["b"] == pytest.approx(0.5, abs=1e-12)


def test_workload_nobody_reaches_is_nan_and_counts_against_everyone() -> None:
    s = P.score_submissions(one({"a": {"w1": [1.0], "w2": [INF]}, "b": {"w1": [1.0], "w2": [INF]}}))
    assert s.fastest["w2"] == INF and math.isnan(s.ratios["a"]["w2"])  # inf / inf, as pandas gives
    assert s.scores == {"a": pytest.approx(0.5, abs=1e-12), "b": pytest.approx(0.5, abs=1e-12)}


def test_fixed_workload_count_with_a_missing_workload() -> None:
    # The benchmark has 4 workloads; nobody ran w4 and b never ran w3. rho divides by 4, not by
    # the 3 columns of the table (the old code gave a 1.0 on {w1, w2, w3}).
    t = {"a": {"w1": [[1.0]], "w2": [[1.0]], "w3": [[1.0]]}, "b": {"w1": [[1.0]], "w2": [[2.0]]}}
    s = P.score_submissions(t, workloads=["w1", "w2", "w3", "w4"])
    assert s.n_workloads == 4
    assert s.profiles["a"] == [0.75] * 100 and s.scores["a"] == pytest.approx(0.75, abs=1e-12)
    assert s.ratios["b"]["w3"] == INF and s.profiles["b"][0] == 0.25 and s.profiles["b"][33] == 0.5
    with pytest.raises(ValueError, match="n_workloads=2 is less than the 4 workloads"):
        P.score_submissions(t, workloads=["w1", "w2", "w3", "w4"], n_workloads=2)


def test_ties_share_ratio_one() -> None:
    s = P.score_submissions(one({"a": {"w": [5.0]}, "b": {"w": [5.0, 6.0]}, "c": {"w": [10.0]}}))
    assert s.ratios["a"]["w"] == s.ratios["b"]["w"] == 1.0
    assert s.scores["a"] == s.scores["b"] == pytest.approx(1.0, abs=1e-12)
    assert s.ratios["c"]["w"] == 2.0
    # ties inside the median: studies 7, 7, 9 -> 7
    assert P.per_workload_time([[7.0], [9.0], [7.0]]) == 7.0


def test_four_x_rule_is_exact() -> None:
    # t = 4 * best exactly is kept (the reference drops only t > 4 * best); one ulp more is a miss
    # (the old 1e-9 slack kept it).
    over = math.nextafter(40.0, INF)
    s = P.score_submissions(one({"a": {"w": [10.0]}, "b": {"w": [40.0]}, "c": {"w": [over]}}))
    assert s.times["b"]["w"] == 40.0 and s.ratios["b"]["w"] == 4.0
    assert s.per_workload["c"]["w"] == over and s.times["c"]["w"] == INF and s.ratios["c"]["w"] == INF
    # b counts only at the last grid point, which is exactly 4.0: one trapezoid, (0 + 1) / 2 * width, over 3
    assert s.profiles["b"][-1] == 1.0 and sum(s.profiles["b"]) == 1.0
    assert s.scores["b"] == pytest.approx((4.0 - GRID[98]) * 1.0 / 2.0 / 3.0, abs=1e-15)
    assert s.scores["c"] == 0.0


def test_ratio_on_a_grid_point_counts_exactly_there() -> None:
    # r = tau exactly counts (r <= tau); r one ulp above tau does not, at that grid point.
    k = 11
    on = P.profile([GRID[k]], P.taus())
    above = P.profile([math.nextafter(GRID[k], INF)], P.taus())
    assert on[k] == 1.0 and on[k - 1] == 0.0
    assert above[k] == 0.0 and above[k + 1] == 1.0
    # 1 + 3*11/99 (the old grid's point) is one ulp below numpy's, so it counts from k on
    assert P.profile([1 + 3 * 11 / 99], P.taus())[k] == 1.0
    # through the whole pipeline: best 1.0, t = the grid value -> r is exactly that value
    s = P.score_submissions(one({"a": {"w": [1.0]}, "b": {"w": [float(GRID[k])]}}))
    assert s.ratios["b"]["w"] == GRID[k] and s.profiles["b"][k] == 1.0 and s.profiles["b"][k - 1] == 0.0


def test_zero_best_time_gives_nan_ratio_as_the_reference() -> None:
    # A best time of 0 (target met before training): 0 / 0 = NaN for the zero, and every positive
    # time is > 4 * 0, so inf. Nobody counts on that workload (the old code gave the zero 1.0).
    s = P.score_submissions(one({"a": {"w1": [0.0], "w2": [1.0]}, "b": {"w1": [3.0], "w2": [1.0]}}))
    assert math.isnan(s.ratios["a"]["w1"]) and s.ratios["b"]["w1"] == INF
    assert s.scores == {"a": pytest.approx(0.5, abs=1e-12), "b": pytest.approx(0.5, abs=1e-12)}


def test_exact_area_for_a_known_profile() -> None:
    # Two workloads, ratios 1 and 2.5: rho = 1/2 on [1, 2.5), 1 on [2.5, 4].
    # 2.5 lies exactly halfway between grid points 49 and 50, so the trapezoid rule is exact:
    # area = 0.5 * 1.5 + 1 * 1.5 = 2.25, score = 2.25 / 3 = 0.75.
    s = P.score_submissions(one({"a": {"w1": [4.0], "w2": [10.0]}, "b": {"w1": [8.0], "w2": [4.0]}}))
    assert s.ratios["a"] == {"w1": 1.0, "w2": 2.5}
    assert s.scores["a"] == pytest.approx(0.75, abs=1e-12)
    # b: ratios 2 and 1. 2.0 is grid point 33 exactly, so rho jumps there; by hand:
    # 32 segments at 1/2, one segment (32, 33) at (1/2 + 1)/2, 66 segments at 1, each 3/99 wide.
    assert s.scores["b"] == pytest.approx((32 * 0.5 + 0.75 + 66 * 1.0) / 99, abs=1e-12)


def test_score_is_monotone_in_speed() -> None:
    base = {"a": {"w1": [10.0], "w2": [10.0]}}
    fast = P.score_submissions(one({**base, "b": {"w1": [12.0], "w2": [12.0]}})).scores["b"]
    slow = P.score_submissions(one({**base, "b": {"w1": [25.0], "w2": [25.0]}})).scores["b"]
    assert 0 < slow < fast < 1


def reference_scores(table: dict, workloads: list[str], n_workloads: int) -> tuple[dict, np.ndarray]:
    """The published rules, written straight from performance_profile.py with numpy (not dtrain's code)."""
    subs = list(table)
    t = np.full((len(subs), len(workloads)), np.nan)  # a workload a submission never ran: NaN, as pandas' pivot
    for i, s in enumerate(subs):
        for j, w in enumerate(workloads):
            if table[s].get(w):
                t[i, j] = np.median([np.min(study, initial=np.inf) for study in table[s][w]])
    with np.errstate(invalid="ignore", divide="ignore"):
        best = np.where(np.isnan(t).all(axis=0), np.nan, np.nanmin(np.where(np.isnan(t), np.inf, t), axis=0))
        t[t > 4 * best] = np.inf
        r = t / np.where(np.isnan(t).all(axis=0), np.nan, np.nanmin(np.where(np.isnan(t), np.inf, t), axis=0))
        perf = np.stack([(r <= tau).sum(axis=1) / n_workloads for tau in GRID], axis=1)
    trapezoid = getattr(np, "trapezoid", None) or np.trapz
    scores = trapezoid(perf, x=GRID, axis=1) / (GRID.max() - GRID.min())
    return dict(zip(subs, scores.tolist())), r


def _random_table(rng: random.Random) -> tuple[dict, list[str]]:
    workloads = [f"w{i}" for i in range(rng.randint(1, 6))]
    base = {w: rng.choice([1.0, 2.0, 0.5, 10.0, rng.uniform(0.5, 10)]) for w in workloads}
    table: dict = {}
    for s in range(rng.randint(1, 6)):
        per_w = {}
        for w in workloads:
            if rng.random() < 0.1:
                continue  # this submission never ran w
            studies = []
            for _ in range(rng.randint(1, 4)):
                trial = []
                for _ in range(rng.randint(0, 3)):
                    pick = rng.random()
                    if pick < 0.15:
                        trial.append(INF)
                    elif pick < 0.3:  # on the 4x boundary, on a grid ratio, or a tie
                        trial.append(base[w] * rng.choice([4.0, 1.0, float(GRID[rng.randrange(100)])]))
                    elif pick < 0.33:
                        trial.append(0.0)
                    else:
                        trial.append(base[w] * rng.uniform(1.0, 6.0))
                studies.append(trial)
            per_w[w] = studies
        table[f"s{s}"] = per_w
    return table, workloads


@pytest.mark.parametrize("seed", range(4))
def test_agrees_with_the_published_rules_on_random_tables(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(150):
        table, workloads = _random_table(rng)
        n = len(workloads) + rng.choice([0, 0, 1, 3])  # sometimes the benchmark has workloads nobody ran
        want, want_r = reference_scores(table, workloads, n)
        got = P.score_submissions(table, workloads=workloads, n_workloads=n)
        for i, s in enumerate(table):
            assert abs(got.scores[s] - want[s]) <= 1e-12, (table, s)
            for j, w in enumerate(workloads):
                g, r = got.ratios[s][w], want_r[i, j]
                # a miss is a miss: inf or NaN (the reference's NaN for a workload never run is our inf)
                assert (g == r) or (not math.isfinite(g) and not math.isfinite(r)), (table, s, w)


def test_study_config_loads_and_rejects_bad_keys(tmp_path: Path) -> None:
    from dtrain.scoring.study import ALGOPERF_V06, load_study

    v06 = load_study(Path(__file__).resolve().parents[1] / "configs" / "studies" / "algoperf_v06.yaml")
    assert v06 == ALGOPERF_V06 and (v06.studies, v06.trials, v06.ruleset) == (3, 5, "external")
    bad = tmp_path / "s.yaml"
    bad.write_text("ruleset: external\nstudy: 3\n")
    with pytest.raises(ValueError, match="unknown key 'study'"):
        load_study(bad)
    bad.write_text("ruleset: fast\n")
    with pytest.raises(ValueError, match="ruleset must be one of"):
        load_study(bad)


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
    d = tmp_path / "x" / "w1" / "study-1" / "trial-0"  # the studies layout beside the old one
    d.mkdir(parents=True)
    (d / "summary.json").write_text(json.dumps({"workload": "w1", "reached_target": True, "time_to_target_s": 5.0}))
    trials = collect_trials(tmp_path)
    assert trials == {"x": {"w1": [[3.0, 2.0], [5.0]]}, "y": {"w1": [[INF]]}}


def test_score_command_runs_resumes_and_reports(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Two tiny submissions on digits_cnn, in-process: table, JSON, plot; a rerun runs nothing."""
    from dtrain.scoring.cli import main

    subs = tmp_path / "subs"
    subs.mkdir()
    (subs / "fast.yaml").write_text("optim:\n  name: adamw\n  lr: 0.01\n  warmup_steps: 0\n")
    (subs / "broken.yaml").write_text("optim:\n  name: adamw\n  lr: -1.0\n")  # rejected by config validation
    out = tmp_path / "study"
    argv = [str(subs), "--workloads", "digits_cnn", "--studies", "1", "--trials", "1", "--out", str(out), "--in-process",
            "--set", "steps=60", "--set", "eval_every=20", "--set", "workload.target=0.6",
            "--set", "workload.channels=8", "--set", "workload.hidden=32"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "fast" in text and "broken" in text and "score" in text
    data = json.loads((out / "scores.json").read_text())
    assert data["submissions"]["fast"]["score"] == pytest.approx(1.0)
    assert data["submissions"]["broken"]["score"] == 0.0
    broken = json.loads((out / "broken" / "digits_cnn" / "study-0" / "trial-0" / "summary.json").read_text())
    assert broken["failed"] and "optim.lr" in broken["error"]
    assert (out / "profiles.png").stat().st_size > 0
    first = (out / "fast" / "digits_cnn" / "study-0" / "trial-0" / "summary.json").stat().st_mtime_ns
    assert main(argv) == 0  # resume: every trial has a summary.json, nothing runs again
    assert "2 of 2 trials already finished" in capsys.readouterr().out
    assert (out / "fast" / "digits_cnn" / "study-0" / "trial-0" / "summary.json").stat().st_mtime_ns == first
    assert main(["--runs", str(out), "--workloads", "digits_cnn", "--json", str(tmp_path / "again.json"),
                 "--plot", str(tmp_path / "p.png")]) == 0
    again = json.loads((tmp_path / "again.json").read_text())
    assert again["submissions"]["fast"]["score"] == pytest.approx(1.0)
    # the benchmark's fixed workload count: scored against the default v0.6 set of 4 workloads,
    # one workload reached is a quarter of the profile
    assert main(["--runs", str(out), "--json", str(tmp_path / "v06.json"), "--plot", str(tmp_path / "p.png")]) == 0
    v06 = json.loads((tmp_path / "v06.json").read_text())
    assert v06["n_workloads"] == 4 and v06["submissions"]["fast"]["score"] == pytest.approx(0.25)
    assert main(["--runs", str(out), "--best-trial", "--ruleset", "self"]) == 2
    assert "give one of --best-trial or --ruleset" in capsys.readouterr().err


def test_unfinished_trial_is_rerun(tmp_path: Path) -> None:
    from dtrain.scoring.runner import plan

    sub = tmp_path / "s.yaml"
    sub.write_text("optim:\n  name: adamw\n")
    (trial,) = plan([sub], ["ctr"], trials=1, root=tmp_path / "study")
    assert trial.out_dir.endswith("study-0/trial-0")
    assert not trial.finished
    Path(trial.out_dir).mkdir(parents=True)
    (Path(trial.out_dir) / "metrics.jsonl").write_text("{}\n")  # interrupted mid-run
    assert not trial.finished
    trial.summary_path.write_text("{}")
    assert trial.finished
