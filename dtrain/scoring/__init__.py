"""AlgoPerf-style scoring: time to target, best trial, the 4x rule, performance profiles, score.

`profiles` holds the math (pure functions on small tables), `runner` runs or finds trials,
`report` prints and plots, `cli` is `dtrain score`.
"""

from dtrain.scoring.profiles import Scores, score_submissions, trial_time

__all__ = ["Scores", "score_submissions", "trial_time"]
