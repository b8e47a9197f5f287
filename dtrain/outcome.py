"""What a finished run tells its user: the done lines, what DDP would have sent, a text sample.

`end_facts` adds to summary.json what `done_lines` prints on rank 0, so the terminal and the file
never disagree: the model's sample (workloads that can generate), and ``ddp_equivalent_bytes``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from dtrain.report import si_bytes

SAMPLE_BYTES = 120
SAMPLE_TEMPERATURE = 0.5  # greedy decoding of a small model loops on one word ("the the the"); 0.8 is noise


@contextmanager
def eval_point(optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """Optimizers with train()/eval() modes (Schedule-Free) are measured, and sampled, at their eval point."""
    modal = callable(getattr(optimizer, "eval", None)) and callable(getattr(optimizer, "train", None))
    if modal:
        optimizer.eval()
    try:
        yield
    finally:
        if modal:
            optimizer.train()


def ddp_equivalent(model: nn.Module, *, workers: int, steps: int) -> dict[str, Any]:
    """What one worker would send if DDP trained ``model`` for ``steps`` optimizer steps.

    An estimate from the model size: DDP all-reduces the whole gradient (one element per parameter,
    in the parameter's dtype) every step, and a ring all-reduce sends 2(N-1)/N of it per worker.
    Bucket framing and the step's few scalars are left out; no compression is assumed.
    """
    params = sum(p.numel() for p in model.parameters())
    grad_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    ring = 2 * (workers - 1) / workers if workers > 0 else 0.0
    return {"bytes_per_worker": round(grad_bytes * ring * steps), "params": params,
            "bytes_per_param": grad_bytes / params if params else 0.0, "ring_factor": ring, "steps": steps}


def end_facts(workload: Any, model: nn.Module, optimizer: torch.optim.Optimizer, *, workers: int, steps: int,
              seed: int, can_sample: bool) -> dict[str, Any]:
    """summary.json's ``ddp_equivalent_bytes`` (and its basis) and ``sample`` (None when the workload
    does not generate, or when this process alone cannot run the model: a sharded hierarchical worker)."""
    ddp = ddp_equivalent(model, workers=workers, steps=steps)
    sample = None
    sampler = getattr(workload, "sample", None)  # a factory-built workload may not derive from Workload
    if can_sample and callable(sampler):
        with eval_point(optimizer):
            made = sampler(model, length=SAMPLE_BYTES, seed=seed, temperature=SAMPLE_TEMPERATURE)
        sample = made.as_dict() if made is not None else None
    return {"ddp_equivalent_bytes": ddp.pop("bytes_per_worker"), "ddp_equivalent_basis": ddp, "sample": sample}


def target_phrase(summary: dict[str, Any]) -> str:
    """The validation result against the workload's target, with the distance when it was missed."""
    ev = summary["eval"]
    label, value, target = ev["metric"].replace("_", " "), ev["value"], ev.get("target")
    has_target = target is not None and math.isfinite(target)
    if value is None:
        return f"{label} not finite" + (f", target {float(target)!r} not reached" if has_target else "")
    if not has_target:
        return f"{label} {value:.3f} (this workload sets no target)"
    if summary.get("reached_target"):
        return f"{label} {value:.3f}, target {float(target)!r} reached after {summary['time_to_target_s']:.1f}s of training"
    return f"{label} {value:.3f}, target {float(target)!r} not reached ({value - target:+.3f})"


def comm_phrase(summary: dict[str, Any]) -> str:
    """Bytes this run sent per worker beside what DDP would have sent for the same steps."""
    sent = summary["comm"]["max"].get("bytes_sent", 0)
    ddp = summary.get("ddp_equivalent_bytes")
    basis = summary.get("ddp_equivalent_basis") or {}
    if ddp is None:
        return f"sent {si_bytes(sent)} per worker (max)"
    if summary["world_size"] < 2:
        return f"sent {si_bytes(sent)}: one worker, and DDP would have sent nothing either"
    if sent <= 0:
        ratio = "nothing sent"
    else:
        r = ddp / sent
        ratio = f"{r:.0f}x more" if r >= 10 else f"{r:.1f}x more" if r >= 1.05 else f"{r:.2f}x what this run sent"
    return (f"sent {si_bytes(sent)} per worker; DDP would have sent ~{si_bytes(ddp)} for these {basis.get('steps')} steps "
            f"({ratio}; an estimate from the model size: {basis.get('params', 0):,} parameters x "
            f"{basis.get('bytes_per_param', 0):g} bytes, ring all-reduce every step)")


def printable(text: str) -> str:
    """One terminal-safe line: newlines shown as \\n, control and undecodable bytes escaped."""
    out = []
    for ch in text:
        if ch == "\n":
            out.append("\\n")
        elif ch == "\ufffd" or not (ch.isprintable() or ch == " "):
            out.append("\\x{:02x}".format(ord(ch)) if ord(ch) < 0x100 else "?")
        else:
            out.append(ch)
    return "".join(out)


def done_lines(summary: dict[str, Any], *, out_dir: str, plot: bool) -> list[str]:
    """What rank 0 prints when a run ends: result against the target, bytes against DDP, the sample, files."""
    lines = [f"done: {' + '.join(summary['algorithms'])} on {summary['workload']}, {summary['world_size']} workers, "
             f"{summary['steps']} steps in {summary['wall_s']:.1f}s; {target_phrase(summary)}",
             f"comm: {comm_phrase(summary)}"]
    s = summary.get("sample")
    if s:
        lines.append(f"sample (seed {s['seed']}, temperature {s['temperature']:g}): "
                     f"\"{printable(s['prompt'])}\" -> \"{printable(s['continuation'])}\"")
    lines.append(f"summary: {out_dir}/summary.json" + (f"; plot: {out_dir}/loss.png" if plot else ""))
    return lines
