"""Run (or find) the trials of a scoring study: submissions x workloads x trials, one out dir each.

Layout under the study root: ``ROOT/<submission>/<workload>/study-<j>/trial-<i>/`` (AlgoPerf's
studies x trials; seed = j * trials + i) holding what `dtrain train` writes (``summary.json``
last) plus ``trial.json`` (who/what/budget) and
``trial_config.yaml`` (the merged config that ran). A trial is finished when its summary.json
exists, so an interrupted study resumes where it stopped; an unfinished trial's directory is
cleared and the trial run again from the start.

A submission is a YAML file (usually under ``configs/submissions/``): a fragment of a run
config that names the training algorithm (``optim``, optionally ``algo`` and ``comm`` for the
worker count). Its name is the file stem. The harness supplies the rest: the workload, its
step budget and evaluation interval (``WORKLOAD_RUNS``), the seed (= the trial index), and
``stop_at_target=true`` so a trial ends as soon as the target is reached.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from dtrain.scoring.profiles import budget_factor, trial_time

# Per workload: the step budget (the schedule horizon of every submission), how often to evaluate
# (time to target is measured at evaluations), the default warm-up (5% of the budget; a
# submission may set its own optim.warmup_steps) and config keys the study fixes ("set"). See
# each workload module for how its budget and target were set. char_lm runs scaled down (2
# layers of width 64, 400 steps, 4 evaluation batches) so that a full study fits in ~40 minutes
# of a 2-core machine. Its target there is set like the others: NAdamW (betas (0.9, 0.999), warm-up
# 5%, cosine to 0.1x, clip 1) swept over lr {2e-3, 4e-3, 8e-3} with wd 0.1 (seed 0: val_loss 2.560,
# 2.455, 2.449); at lr 8e-3 seeds 0, 1, 2 reach 2.449 / 2.657 / 2.400; the worst, rounded up: 2.66.
WORKLOAD_RUNS: dict[str, dict[str, Any]] = {
    "digits_cnn": {"steps": 800, "eval_every": 50, "warmup_steps": 40},
    "ctr": {"steps": 1500, "eval_every": 100, "warmup_steps": 75},
    "seq_rnn": {"steps": 600, "eval_every": 50, "warmup_steps": 30},
    "char_lm": {"steps": 400, "eval_every": 50, "warmup_steps": 20,
                "set": ["workload.n_layer=2", "workload.d_model=64", "workload.n_head=4", "workload.eval_batches=4",
                        "workload.target=2.66"]},
}
DEFAULT_WORKLOADS = tuple(WORKLOAD_RUNS)
# What a submission gets unless it says otherwise: one worker, no synchronisation algorithm.
SUBMISSION_DEFAULTS: dict[str, Any] = {"algo": {"name": "none"}, "comm": {"name": "local", "workers": 1}}


@dataclass
class Trial:
    submission: str
    submission_path: str
    workload: str
    seed: int
    out_dir: str
    study: int = 0

    @property
    def summary_path(self) -> Path:
        return Path(self.out_dir) / "summary.json"

    @property
    def finished(self) -> bool:
        return self.summary_path.is_file()


@dataclass
class TrialResult:
    submission: str
    workload: str
    seed: int
    out_dir: str
    time_s: float  # time to target (inf if missed or over budget)
    reached: bool
    train_time_s: float | None
    metric: str | None
    value: float | None
    budget_s: float | None
    target: float | None = None
    error: str | None = None
    study: int = 0
    raw_time_s: float = math.inf  # time to target with no budget applied

    def time_under(self, ruleset: str) -> float:
        """Time to target under ``ruleset``'s budget (self-tuning trains 1.5x longer)."""
        if self.budget_s is None:
            return self.raw_time_s
        return self.raw_time_s if self.raw_time_s <= self.budget_s * budget_factor(ruleset) else math.inf

    def as_json(self) -> dict[str, Any]:
        d = asdict(self)
        for key in ("time_s", "raw_time_s"):
            d[key] = d[key] if math.isfinite(d[key]) else None
        return d


def plan(
    submissions: Sequence[str | Path], workloads: Sequence[str], *, trials: int, root: str | Path, studies: int = 1
) -> list[Trial]:
    """Every (submission, workload, study, trial) in a fixed order: trial index outermost, then
    study, so a partial run already has one trial of everything."""
    if trials < 1 or studies < 1:
        raise ValueError(f"trials and studies must be >= 1, got trials={trials}, studies={studies}")
    out = []
    for i in range(trials):
        for j in range(studies):
            for sub in submissions:
                name = Path(sub).stem
                for wl in workloads:
                    out.append(Trial(name, str(sub), wl, j * trials + i,
                                     str(Path(root) / name / wl / f"study-{j}" / f"trial-{i}"), study=j))
    return out


def trial_overrides(trial: Trial, *, threads: int, run_overrides: Sequence[str] = ()) -> list[str]:
    """The keys the harness fixes for a trial (they win over the submission's YAML)."""
    spec = WORKLOAD_RUNS.get(trial.workload, {})
    keys = [f"workload.name={trial.workload}", f"seed={trial.seed}", f"out_dir={trial.out_dir}", "stop_at_target=true",
            "progress=false", "plot=false", "ckpt_every=0", "resume=false", f"threads={threads}"]
    keys += [f"{k}={spec[k]}" for k in ("steps", "eval_every") if k in spec]
    return keys + list(spec.get("set", [])) + list(run_overrides)


def write_trial_config(trial: Trial) -> Path:
    """Harness defaults < workload warm-up < the submission's YAML; written beside the trial's results."""
    from omegaconf import OmegaConf

    base = OmegaConf.create(SUBMISSION_DEFAULTS)
    spec = WORKLOAD_RUNS.get(trial.workload, {})
    if "warmup_steps" in spec:
        base = OmegaConf.merge(base, {"optim": {"warmup_steps": spec["warmup_steps"]}})
    merged = OmegaConf.merge(base, OmegaConf.load(trial.submission_path))
    path = Path(trial.out_dir) / "trial_config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(OmegaConf.to_yaml(merged))
    return path


def _budget(config_path: Path, overrides: list[str]) -> float | None:
    from omegaconf import OmegaConf

    from dtrain.config import load

    cfg = load(config_path, overrides)
    budget = OmegaConf.select(cfg, "workload.time_budget_s")
    return float(budget) if budget is not None else None


def run_trial(trial: Trial, *, threads: int = 1, in_process: bool = False, timeout_s: float | None = None,
              run_overrides: Sequence[str] = ()) -> TrialResult:
    """Run one trial from scratch (its directory is cleared first) and read back its result.

    A trial whose training fails (diverged, bad config) or times out gets a summary.json that
    records the error and counts as a miss, so a resumed study does not run it again.
    """
    out = Path(trial.out_dir)
    if out.exists():
        shutil.rmtree(out)
    config_path = write_trial_config(trial)
    overrides = trial_overrides(trial, threads=threads, run_overrides=run_overrides)
    meta = {"submission": trial.submission, "submission_path": trial.submission_path, "workload": trial.workload,
            "study": trial.study, "seed": trial.seed, "overrides": overrides, "time_budget_s": None}
    error = None
    try:
        meta["time_budget_s"] = _budget(config_path, overrides)
    except ValueError as e:  # ConfigError: the submission does not fit this workload
        error = f"config: {e}"
    (out / "trial.json").write_text(json.dumps(meta, indent=2))
    if error is None:
        error = _in_process(config_path, overrides) if in_process else _subprocess(config_path, overrides, timeout_s)
    if error is not None and not trial.finished:
        _write_json(trial.summary_path, {"workload": trial.workload, "reached_target": False, "time_to_target_s": None,
                                         "error": error, "failed": True})
    return read_result(trial.summary_path, submission=trial.submission, seed=trial.seed, study=trial.study)


def _in_process(config_path: Path, overrides: list[str]) -> str | None:
    from dtrain.config import load
    from dtrain.train import run

    try:
        run(load(config_path, overrides))
    except Exception as e:  # noqa: BLE001 - any failure of a submission is a miss, not a crash of the study
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return None


def _subprocess(config_path: Path, overrides: list[str], timeout_s: float | None) -> str | None:
    cmd = [sys.executable, "-m", "dtrain.cli", "train", str(config_path), *overrides]
    log = config_path.parent / "trial.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT)
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            return f"timeout: still running after {timeout_s:.0f}s"
        except KeyboardInterrupt:
            proc.kill()
            proc.wait()
            raise
    if rc == 0:
        return None
    if rc in (130, -2):  # interrupted (Ctrl-C reaches the whole process group): leave it unfinished
        raise KeyboardInterrupt(f"trial interrupted (exit {rc})")
    if rc < 0:
        return f"killed by signal {-rc}"
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    return f"exit {rc}: {lines[-1] if lines else 'no output'}"


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    tmp.replace(path)


def read_result(summary_path: Path, *, submission: str | None = None, seed: int | None = None,
                study: int | None = None) -> TrialResult:
    """A TrialResult from a summary.json (and the trial.json beside it, when there is one)."""
    summary = json.loads(summary_path.read_text())
    meta_path = summary_path.parent / "trial.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    budget = meta.get("time_budget_s")
    ev = summary.get("eval") or {}
    return TrialResult(
        submission=submission or meta.get("submission") or _guess_submission(summary_path, summary),
        workload=summary.get("workload") or meta.get("workload") or "?",
        seed=int(seed if seed is not None else meta.get("seed", -1)),
        out_dir=str(summary_path.parent),
        time_s=trial_time(summary, budget_s=budget),
        reached=bool(summary.get("reached_target")),
        train_time_s=summary.get("train_time_s"),
        metric=ev.get("metric"),
        value=ev.get("value"),
        budget_s=budget,
        target=ev.get("target"),
        error=summary.get("error"),
        study=int(study if study is not None else meta.get("study", _study_from_path(summary_path))),
        raw_time_s=trial_time(summary),
    )


def _study_from_path(summary_path: Path) -> int:
    name = summary_path.parent.parent.name
    return int(name.split("-", 1)[1]) if name.startswith("study-") and name.split("-", 1)[1].isdigit() else 0


def _guess_submission(summary_path: Path, summary: dict[str, Any]) -> str:
    parts = summary_path.parent.parts
    depth = 4 if summary_path.parent.parent.name.startswith("study-") else 3
    if len(parts) >= depth:
        return parts[-depth]  # .../<submission>/<workload>/[study-<j>/]<trial>/summary.json
    return f"{summary.get('algorithm', '?')}+{summary.get('optimizer', '?')}"


def collect_results(root: str | Path) -> list[TrialResult]:
    """Every finished trial under ``root`` (any depth), in path order."""
    return [read_result(p) for p in sorted(Path(root).rglob("summary.json"))]


def study_table(results: Sequence[TrialResult], *, ruleset: str = "external",
                names: Sequence[str] = ()) -> dict[str, dict[str, list[list[float]]]]:
    """submission -> workload -> studies (in study order) -> trial times under ``ruleset``'s budget.

    ``names`` lists submissions to include even if none of their trials finished.
    """
    by_study: dict[str, dict[str, dict[int, list[float]]]] = {n: {} for n in names}
    for r in results:
        by_study.setdefault(r.submission, {}).setdefault(r.workload, {}).setdefault(r.study, []).append(r.time_under(ruleset))
    return {s: {w: [st[j] for j in sorted(st)] for w, st in per_w.items()} for s, per_w in by_study.items()}


def collect_trials(root: str | Path, *, ruleset: str = "external") -> dict[str, dict[str, list[list[float]]]]:
    """submission -> workload -> studies -> [time to target per trial] from the summary.json files under ``root``."""
    return study_table(collect_results(root), ruleset=ruleset)


def run_study(
    trials: Sequence[Trial],
    *,
    threads: int = 1,
    jobs: int = 1,
    in_process: bool = False,
    timeout_s: float | None = None,
    run_overrides: Sequence[str] = (),
    echo: Callable[[str], None] = print,
) -> list[TrialResult]:
    """Run the unfinished trials (``jobs`` at a time), report progress, and return every result."""
    todo = [t for t in trials if not t.finished]
    done_before = len(trials) - len(todo)
    if done_before:
        echo(f"resuming: {done_before} of {len(trials)} trials already finished, {len(todo)} to run")
    start = time.perf_counter()
    counter = {"n": 0}

    def one(trial: Trial) -> None:
        r = run_trial(trial, threads=threads, in_process=in_process, timeout_s=timeout_s, run_overrides=run_overrides)
        counter["n"] += 1
        n = counter["n"]
        elapsed = time.perf_counter() - start
        eta = elapsed / n * (len(todo) - n)
        got = f"target in {r.time_s:.1f}s" if math.isfinite(r.time_s) else "missed"
        if r.error:
            got += f" ({r.error[:80]})"
        value = f"{r.metric}={r.value:.4f}" if isinstance(r.value, (int, float)) else ""
        echo(f"[{done_before + n}/{len(trials)}] {trial.submission} x {trial.workload} study {trial.study} seed {trial.seed}: {got} {value}"
             f"  (elapsed {elapsed:.0f}s, eta {eta:.0f}s)")

    if jobs <= 1 or in_process:
        for t in todo:
            one(t)
    else:
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            list(pool.map(one, todo))
    return [read_result(t.summary_path, submission=t.submission, seed=t.seed, study=t.study) for t in trials if t.finished]
