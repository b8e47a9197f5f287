"""How Streaming DiLoCo/NoLoCo cut the parameters into P fragments.

A fragment is a list of pieces ``(i, start, end)``: elements [start, end) of parameter i's flat
view. `split_even` cuts the concatenated parameters (in the optimizer's order) into P runs of
equal element count, within one element, so each fragment's traffic is 1/P of the model's even
when single tensors are larger than 1/P; a piece covering a whole tensor is that tensor itself.
`split_by_paths` keeps tensors whole and groups them by module-path prefixes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

Piece = tuple[int, int, int]  # (parameter index, start, end) of the parameter's flat view


def check_schedule(cfg: Any) -> None:
    """The fragment and overlap keys of Streaming DiLoCo/NoLoCo: one-line ValueErrors naming the key."""
    if cfg.fragments < 1:
        raise ValueError(f"algo.fragments must be >= 1, got {cfg.fragments}")
    if cfg.fragment_paths and len(cfg.fragment_paths) != cfg.fragments:
        raise ValueError(f"algo.fragment_paths lists {len(cfg.fragment_paths)} fragments but algo.fragments="
                         f"{cfg.fragments}; set algo.fragments={len(cfg.fragment_paths)}")
    if cfg.sync_every % cfg.fragments:
        raise ValueError(f"algo.sync_every={cfg.sync_every} must be a multiple of algo.fragments={cfg.fragments} "
                         "(fragments are due every sync_every/fragments steps)")
    if not 0 <= cfg.overlap_steps < cfg.sync_every:
        raise ValueError(f"algo.overlap_steps must be in [0, algo.sync_every={cfg.sync_every}), got {cfg.overlap_steps}")
    if not 0 <= cfg.mix_alpha < 1:
        raise ValueError(f"algo.mix_alpha must be in [0, 1), got {cfg.mix_alpha}")


def split_even(params: Sequence[torch.Tensor], parts: int) -> list[list[Piece]]:
    """``parts`` fragments of (almost) equal element count, contiguous in parameter order."""
    sizes = [p.numel() for p in params]
    total = sum(sizes)
    if not 1 <= parts <= total:
        raise ValueError(f"algo.fragments={parts} must be in [1, {total}] (the parameters' element count)")
    cuts = [round(k * total / parts) for k in range(parts + 1)]
    out: list[list[Piece]] = [[] for _ in range(parts)]
    offset = 0
    for i, n in enumerate(sizes):
        for k in range(parts):
            a, b = max(cuts[k], offset), min(cuts[k + 1], offset + n)
            if a < b:
                if (a, b) != (offset, offset + n) and not params[i].is_contiguous():
                    raise ValueError(f"parameter {i} is not contiguous and cannot be cut between fragments; "
                                     "use algo.fragment_paths to group whole tensors")
                out[k].append((i, a - offset, b - offset))
        offset += n
    return out


def split_by_paths(names: Sequence[str], sizes: Sequence[int], paths: Sequence[str]) -> list[list[Piece]]:
    """Whole tensors grouped by module-path prefixes (one comma-separated entry per fragment; the
    first entry that matches wins); every parameter must match and every entry must match one."""
    prefixes = [[q.strip() for q in entry.split(",") if q.strip()] for entry in paths]
    out: list[list[Piece]] = [[] for _ in paths]
    for i, name in enumerate(names):
        hit = next((p for p, pre in enumerate(prefixes) if any(name == q or name.startswith(q + ".") for q in pre)), None)
        if hit is None:
            raise ValueError(f"parameter {name} is in no entry of algo.fragment_paths; add its module path to one")
        out[hit].append((i, 0, sizes[i]))
    empty = [paths[p] for p, pieces in enumerate(out) if not pieces]
    if empty:
        raise ValueError(f"algo.fragment_paths entry {empty[0]!r} matches no parameter; fix or drop it")
    return out


def view(t: torch.Tensor, piece: Piece) -> torch.Tensor:
    """The piece of ``t`` (``t`` itself when the piece is all of it); writes go to ``t``."""
    _, a, b = piece
    return t if (a, b) == (0, t.numel()) else t.view(-1)[a:b]


def fragments_of(params: Sequence[torch.Tensor], parts: int, paths: Sequence[str],
                 model: torch.nn.Module | None) -> list[list[Piece]]:
    """`split_by_paths` when ``paths`` are given (names from ``model``), else `split_even`."""
    if not paths:
        return split_even(params, parts)
    if model is None:
        raise ValueError("algo.fragment_paths needs the model's parameter names: pass model=...")
    names = {id(p): n for n, p in model.named_parameters()}
    return split_by_paths([names.get(id(p), f"<unnamed {i}>") for i, p in enumerate(params)], [p.numel() for p in params],
                          list(paths))
