"""What NoLoCo and Streaming NoLoCo share: the shared-seed groups, γ and its stability range, and
the gossip update of φ and δ from the members that answered.

With Δ_i = θ_i − φ_i and means over the members that answered (own values included):

    δ_i ← α·δ_i + β·mean(Δ) − γ·(φ_i − mean(φ))
    φ_i ← φ_i + δ_i

or, with ``nesterov`` (the look-ahead form of torch's Nesterov SGD, which DiLoCo uses), with
s_i = β·mean(Δ) − γ·(φ_i − mean(φ)): δ_i ← α·δ_i + s_i, φ_i ← φ_i + s_i + α·δ_i.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from dtrain.seeding import generator

Flats = list[torch.Tensor]  # one flat vector per dtype group of the parameters


def effective_gamma(cfg: Any) -> float:
    return float(cfg.outer_lr if cfg.gamma is None else cfg.gamma)


def check_gossip(cfg: Any) -> None:
    """γ, group size and timeout: one-line ValueErrors naming the key (NoLoCo and Streaming NoLoCo)."""
    if cfg.gamma is not None and cfg.gamma < 0:
        raise ValueError(f"algo.gamma must be >= 0 (or null for outer_lr), got {cfg.gamma}")
    if cfg.group_size < 2:
        raise ValueError(f"algo.group_size must be >= 2, got {cfg.group_size}")
    if cfg.timeout_s <= 0:
        raise ValueError(f"algo.timeout_s must be > 0, got {cfg.timeout_s}")
    alpha, gamma = cfg.outer_momentum, effective_gamma(cfg)
    if cfg.nesterov:
        if alpha == 0:
            raise ValueError("algo.nesterov=true needs algo.outer_momentum > 0 (set algo.nesterov=false)")
        # The paper's range is for its own form. For the Nesterov form we check the condition of one
        # fixed pair (derived here, not in the paper): the consensus error e and momentum m evolve by
        # [[1 − γ(1+α), α²], [−γ, α]], whose eigenvalues lie inside the unit circle iff 0 < γ < 2(1+α)/(1+2α).
        upper = 2 * (1 + alpha) / (1 + 2 * alpha)
        if cfg.group_size == 2 and not 0 < gamma < upper:
            raise ValueError(f"algo.gamma={gamma:g} is outside the stability range (0, {upper:.4g}) that group_size 2 "
                             "needs with algo.nesterov=true (0 < gamma < 2(1 + outer_momentum)/(1 + 2 outer_momentum)); "
                             "set algo.gamma inside it")
        return
    upper = math.sqrt(2 + alpha**2)
    if cfg.group_size == 2 and not alpha < gamma < upper:
        raise ValueError(
            f"algo.gamma={gamma:g} is outside the stability range ({alpha:g}, {upper:.4g}) that group_size 2 "
            "needs (outer_momentum < gamma < sqrt(2 + outer_momentum^2)); set algo.gamma inside it"
        )


def groups_for_round(members: Sequence[int], round_: int, *, seed: int, group_size: int) -> list[list[int]]:
    """The round's groups: chunks of a shared-seed permutation; a lone leftover joins the last group.

    A pure function of (members, round, seed, group size), so every worker computes the same
    matching without talking. Groups are sorted by rank; every member is in exactly one group.
    """
    ordered = sorted(members)
    if not ordered:
        return []
    perm = torch.randperm(len(ordered), generator=generator("noloco-groups", seed, round_)).tolist()
    shuffled = [ordered[i] for i in perm]
    n = min(group_size, len(shuffled))
    groups = [shuffled[i : i + n] for i in range(0, len(shuffled), n)]
    if len(groups) > 1 and len(groups[-1]) == 1:
        groups[-2].extend(groups.pop())
    return [sorted(g) for g in groups]


def group_of(rank: int, members: Sequence[int], round_: int, *, seed: int, group_size: int) -> list[int]:
    """The other members of ``rank``'s group in round ``round_`` (empty if ``rank`` is not a member)."""
    for g in groups_for_round(members, round_, seed=seed, group_size=group_size):
        if rank in g:
            return [j for j in g if j != rank]
    return []


def outer_move(phi: torch.Tensor, momentum: torch.Tensor, mean_delta: torch.Tensor, pull: torch.Tensor, *, alpha: float,
               beta: float, gamma: float, nesterov: bool) -> None:
    """One group's φ and δ in place, given mean(Δ) and ``pull`` = mean(φ) − φ_i (both may be overwritten)."""
    if nesterov:
        step = mean_delta.mul_(beta).add_(pull, alpha=gamma)
        momentum.mul_(alpha).add_(step)
        phi.add_(step).add_(momentum, alpha=alpha)
    else:
        momentum.mul_(alpha).add_(mean_delta, alpha=beta).add_(pull, alpha=gamma)
        phi.add_(momentum)


def gossip_update(phi: Flats, momentum: Flats, delta: Flats, received: dict[int, tuple[Flats, Flats]], *, rank: int,
                  alpha: float, beta: float, gamma: float, nesterov: bool = False) -> None:
    """φ and δ in place from own ``delta`` and the members' (Δ_j, φ_j) in ``received``.

    Sums run in rank order, so every member that saw the same messages computes identical means."""
    members = sorted([rank, *received])
    for g, (p, mom) in enumerate(zip(phi, momentum)):
        sum_delta, sum_phi = torch.zeros_like(delta[g]), torch.zeros_like(p)
        for j in members:
            d, q = (delta[g], p) if j == rank else (received[j][0][g], received[j][1][g])
            sum_delta.add_(d)
            sum_phi.add_(q)
        count = len(members)
        outer_move(p, mom, sum_delta.div_(count), sum_phi.div_(count).sub_(p), alpha=alpha, beta=beta, gamma=gamma,
                   nesterov=nesterov)
