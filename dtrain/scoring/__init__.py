"""AlgoPerf v0.6 scoring: time to target, studies x trials, the 4x rule, performance profiles, score.

`profiles` holds the math (pure functions on small tables), `study` the rules and layout of a
study, `runner` runs or finds trials, `network` the network track's cost model, `report` prints
and plots, `cli` is `dtrain score`.
"""

from dtrain.scoring.profiles import Scores, score_submissions, trial_time

__all__ = ["Scores", "score_submissions", "trial_time"]
