"""Robust aggregation of the workers' vectors: coordinate-wise trimmed mean or median, and a norm bound.

A mean lets one worker move the result as far as it likes (send x1000 and the mean is ruined);
these estimators bound what a minority of bad contributions can do:

- ``trimmed_mean``: per coordinate, drop the k = floor(trim * n) smallest and k largest of the n
  values and average the rest (Yin et al. 2018);
- ``median``: per coordinate, the middle value (for even n, the mean of the two middle ones, as
  numpy's median);
- norm bound c > 0: a contribution whose L2 norm exceeds c * reference is scaled down to that
  norm before aggregating. The reference is the worker's own update where each worker may
  compute its own result (NoLoCo's groups); where every worker must compute the same result
  (DDP, DiLoCo) it is the median of the contributions' norms, a value every worker shares.

Everything here is pure tensor math on a stack of rows (one row per contributing worker) plus
`Tracker`, which counts per peer how often it was clipped, stood out, or was dropped, names it
in the log (a bounded number of lines), and reports it. No communication here.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import torch

log = logging.getLogger(__name__)

MODES = ("none", "trimmed_mean", "median")
DEFAULT_TRIM = 0.25
# A contribution this many times farther from the robust result than the median contribution is
# named an outlier in the report (it changes nothing in the result: the estimator already ignored it).
OUTLIER_FACTOR = 4.0
KINDS = ("clipped", "outliers", "dropped")


@dataclass(frozen=True)
class Options:
    mode: str = "none"
    trim: float = DEFAULT_TRIM
    norm_bound: float = 0.0  # 0: off; else a multiple of the reference norm

    @property
    def active(self) -> bool:
        """Whether aggregation needs every contribution (an all-gather) rather than a plain mean."""
        return self.mode != "none" or self.norm_bound > 0


def check_options(mode: str, trim: float, norm_bound: float) -> None:
    """One-line errors for the three ``algo.robust*`` keys."""
    if mode not in MODES:
        raise ValueError(f"algo.robust must be one of {list(MODES)}, got {mode!r}")
    if not 0 < trim < 0.5:
        raise ValueError(f"algo.robust_trim must be in (0, 0.5), got {trim}")
    if mode != "trimmed_mean" and trim != DEFAULT_TRIM:
        raise ValueError(f"algo.robust_trim={trim:g} only applies to algo.robust=trimmed_mean; set that or drop algo.robust_trim")
    if not (norm_bound == 0 or 1 <= norm_bound < math.inf):
        raise ValueError(f"algo.robust_norm_bound must be 0 (off) or >= 1 (a multiple of the reference norm), got {norm_bound}")


def common_dtype(tensors: list[torch.Tensor]) -> torch.dtype:
    """The dtype one row of every tensor's values needs (the widest; the tensors' own if they share one)."""
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def degenerate(opts: Options, n: int) -> str | None:
    """Why the mode cannot change anything among ``n`` contributions (it would be ignored), or None."""
    if opts.mode == "trimmed_mean" and trim_count(n, opts.trim) == 0:
        fix = f"raise algo.robust_trim to at least {1 / n:.3g} or use algo.robust=median" if n > 2 else "use algo.robust_norm_bound"
        return f"algo.robust=trimmed_mean with algo.robust_trim={opts.trim:g} trims nobody among {n}; {fix}"
    if opts.mode == "median" and n <= 2:
        return f"algo.robust=median of {n} is their mean; use algo.robust_norm_bound"
    return None


def trim_count(n: int, trim: float) -> int:
    """Values dropped at each end: floor(trim * n), with a tolerance so that 1/3 * 3 counts as 1."""
    return int(math.floor(trim * n + 1e-9))


def trimmed_mean(rows: torch.Tensor, trim: float) -> torch.Tensor:
    """Per column of ``rows`` (n x d): the mean after dropping the floor(trim*n) smallest and largest."""
    n = rows.shape[0]
    k = trim_count(n, trim)
    if k == 0:
        return rows.mean(0)
    return rows.sort(dim=0).values[k : n - k].mean(0)


def median(rows: torch.Tensor) -> torch.Tensor:
    """Per column of ``rows`` (n x d): the median; for even n the mean of the two middle values."""
    n = rows.shape[0]
    ordered = rows.sort(dim=0).values
    if n % 2:
        return ordered[n // 2].clone()
    return (ordered[n // 2 - 1] + ordered[n // 2]) / 2


def clip_rows(rows: torch.Tensor, bound: float) -> tuple[torch.Tensor, list[int]]:
    """Rows whose L2 norm exceeds ``bound`` scaled down to it; also the indices of those rows."""
    norms = rows.norm(dim=1)
    over = norms > bound
    if not bool(over.any()):
        return rows, []
    scale = torch.where(over, bound / norms.clamp_min(torch.finfo(norms.dtype).tiny), torch.ones_like(norms))
    return rows * scale[:, None], over.nonzero().flatten().tolist()


@dataclass
class Result:
    value: torch.Tensor
    clipped: list[int] = field(default_factory=list)  # row indices
    outliers: list[int] = field(default_factory=list)  # row indices


def aggregate(rows: torch.Tensor, opts: Options, *, reference: float | None = None) -> Result:
    """The robust mean of ``rows`` (n x d). ``reference``: the norm the bound multiplies (None: the
    median of the rows' norms, which every worker holding the same rows computes alike)."""
    clipped: list[int] = []
    if opts.norm_bound > 0:
        ref = float(median(rows.norm(dim=1)[:, None])) if reference is None else float(reference)
        rows, clipped = clip_rows(rows, opts.norm_bound * ref)
    if opts.mode == "trimmed_mean":
        value = trimmed_mean(rows, opts.trim)
    elif opts.mode == "median":
        value = median(rows)
    else:
        value = rows.mean(0)
    outliers: list[int] = []
    if opts.mode != "none" and rows.shape[0] >= 3:
        dist = (rows - value).norm(dim=1)
        typical = float(median(dist[:, None]))
        outliers = [i for i, d in enumerate(dist.tolist()) if d > OUTLIER_FACTOR * typical]
    return Result(value, clipped, outliers)


class Tracker:
    """Per peer, how often it was clipped, stood out (outliers) or was dropped (bad or missing data).

    Logs one warning line the 1st, 2nd, 4th, 8th, ... time a peer is noted for a kind, so a
    persistent attacker is named without flooding the log.
    """

    def __init__(self, owner: str, opts: Options) -> None:
        self.owner, self.opts = owner, opts
        self.rounds = 0
        self.degenerate_rounds = 0  # rounds with too few contributions for the mode to act (a plain mean)
        self.counts: dict[str, dict[int, int]] = {k: {} for k in KINDS}

    def round(self, result: Result, ranks: list[int], *, rank: int, where: str) -> None:
        """Count one aggregation whose rows came from ``ranks``; name its clipped rows and outliers."""
        self.rounds += 1
        why = degenerate(self.opts, len(ranks))
        if why is not None:
            self.degenerate_rounds += 1
            if self.degenerate_rounds == 1:
                log.warning("%s robust aggregation on rank %d, %s: %s (further such rounds are only counted)",
                            self.owner, rank, where, why)
        self.note("clipped", [ranks[i] for i in result.clipped], rank=rank, where=where)
        self.note("outliers", [ranks[i] for i in result.outliers], rank=rank, where=where)

    def note(self, kind: str, peers: list[int], *, rank: int, where: str) -> None:
        for peer in peers:
            n = self.counts[kind][peer] = self.counts[kind].get(peer, 0) + 1
            if n & (n - 1) == 0:
                log.warning("%s robust aggregation on rank %d, %s: peer %d %s (%d time%s so far)", self.owner, rank, where,
                            peer, _SAYS[kind], n, "" if n == 1 else "s")

    def report(self) -> dict[str, Any]:
        return {"mode": self.opts.mode, "trim": self.opts.trim if self.opts.mode == "trimmed_mean" else None,
                "norm_bound": self.opts.norm_bound, "rounds": self.rounds, "degenerate_rounds": self.degenerate_rounds,
                **{k: dict(sorted(v.items())) for k, v in self.counts.items()}}

    def state_dict(self) -> dict[str, Any]:
        return {"rounds": self.rounds, "degenerate_rounds": self.degenerate_rounds, **{k: dict(v) for k, v in self.counts.items()}}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        state = state or {}
        self.rounds = int(state.get("rounds", 0))
        self.degenerate_rounds = int(state.get("degenerate_rounds", 0))
        self.counts = {k: {int(p): int(n) for p, n in state.get(k, {}).items()} for k in KINDS}


_SAYS = {"clipped": "sent a contribution over the norm bound (clipped)",
         "outliers": "sent a contribution far from the robust mean (outlier, ignored by the estimator)",
         "dropped": "sent malformed or non-finite data or none (dropped)"}
