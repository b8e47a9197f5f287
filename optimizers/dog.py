"""DoG and LDoG (Ivgi, Hinder & Carmon, 2023): SGD with step size max distance / sqrt(sum of squared gradient norms).

Matches dog-optimizer 1.0.3 numerically. DoG keeps one step size per param
group, LDoG one per tensor. Pair either with
:class:`optimizers.averager.PolynomialDecayAverager` (gamma=8): the method
has no decay schedule and relies on iterate averaging for its final point.

Differences from the reference that are not numerical: p.grad is never
modified (weight decay is added on the fly); a parameter without a gradient on
a step is not updated but, as in the paper, still counts in the distance
||x_t - x_0|| and in the first r-bar (the whole vector; the reference crashes
on it); the partial sums are pulled to the host once per step; with
``process_group`` or ``comm`` they are summed over workers that hold different
shards of the parameters (every worker enters every reduction).

bfloat16/float16 parameters: DoG's first steps are ~reps_rel times the weights,
far below their rounding step, so the update is computed on a float32 master
copy (state "master", with x0 in float32) and rounded into the parameter.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from . import _common, _lowp, _native
from ._common import (KeepsExtras, ParamsT, Reducer, Scratch, buckets, by_device_dtype, check_fused, check_range,
                      dense, dot, fresh, local, pull_scattered, sumsq, use_fused)


class DoG(KeepsExtras, torch.optim.Optimizer):
    """Distance over Gradients: eta = lr * max_t ||x_t - x_0|| / sqrt(sum_t ||g_t||^2 + eps), per param group.

    ``reps_rel`` sets the first distance, reps_rel * (1 + ||x_0||); use 1e-4 with
    batch norm. ``init_eta`` fixes the first step size instead. ``weight_decay``
    is an L2 penalty added to the gradient. Keep ``lr`` (c in the paper) at 1.
    ``fused`` (None: where supported) computes the statistics and the update
    as native passes (optimizers/csrc) on contiguous float32/float64 CPU
    tensors, else the update as torch's fused SGD kernel; ``fused=False``: neither.
    """

    layer_wise = False

    def __init__(self, params: ParamsT, lr: float = 1.0, *, reps_rel: float = 1e-6,
                 weight_decay: float = 0.0, eps: float = 1e-8, init_eta: Optional[float] = None,
                 foreach: bool = True, fused: Optional[bool] = None, process_group: Any = None,
                 comm: Any = None) -> None:
        name = type(self).__name__
        check_fused(name, fused, foreach)
        check_range(name, "lr", lr, 0.0, lo_open=True)
        check_range(name, "weight_decay", weight_decay, 0.0)
        check_range(name, "eps", eps, 0.0)
        if init_eta is not None:
            check_range(name, "init_eta", init_eta, 0.0, lo_open=True)
            reps_rel = 0.0  # the first step is set directly; distances start from zero
        else:
            check_range(name, "reps_rel", reps_rel, 0.0, lo_open=True)
        self._reducer = Reducer(name, process_group, comm)
        self._scratch = Scratch()
        defaults = dict(lr=lr, reps_rel=reps_rel, weight_decay=weight_decay, eps=eps,
                        init_eta=init_eta, foreach=foreach, fused=fused, rbar=None, G=None, eta=None)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # Phase 1: per unit (group, or tensor for LDoG) the squared distance from x0
        # (||x0||^2 on the first step) and the squared gradient norm, on device.
        parts: list[Tensor] = []
        slots: list[int] = []  # where each partial sum goes: [dist2 units, gsq units] per group
        size = 0
        plan = []
        device = None
        for group in self.param_groups:
            params = group["params"]
            states = [self.state[p] for p in params]
            active = [i for i, p in enumerate(params) if p.grad is not None]
            first = group["rbar"] is None
            # What the update is computed on (fp32 masters of low-precision params) and with.
            ws = [_lowp.master(st, p) if p.grad is not None or "master" in st else p for p, st in zip(params, states)]
            gs = {i: _lowp.grad(params[i]) for i in active}
            for w, p, st in zip(ws, params, states):
                if "x0" not in st:  # every parameter of the group: the distance is over the whole vector
                    st["x0"] = _lowp.float_state(w, p)
            # shards of DTensor parameters (FSDP2): the distances and norms are summed by the reducer
            ws, gs = [local(w) for w in ws], {i: local(g) for i, g in gs.items()}
            x0s = [local(st["x0"]) for st in states]
            n_units = len(params) if self.layer_wise else 1
            for i in (i for i, p in enumerate(params) if p.grad is None):  # not updated, still part of x
                diff = ws[i] if first else ws[i] - x0s[i]
                parts.append(dot(diff, diff))
                slots.append(size + (i if self.layer_wise else 0))
            for (dev, _), sub in by_device_dtype(len(active), lambda j: ws[active[j]]).items():
                device = dev
                ids = [active[j] for j in sub]
                lists = [[ws[i] for i in ids], [gs[i] for i in ids], [x0s[i] for i in ids]]
                if group["foreach"] and _native.usable(group.get("fused"), *lists):  # one pass, no temporaries
                    sums = _native.run(_native.DOG_STATS, lists, [group["weight_decay"], float(first)], nred=2)
                    if self.layer_wise:
                        units = [size + i for i in ids]
                        slots.extend(units + [u + n_units for u in units])
                        parts.append(sums.t().reshape(-1))  # all distances, then all gradient norms
                    else:
                        slots.extend([size, size + 1])
                        parts.extend(sums.sum(0).unbind())
                    continue
                fn = _stats_foreach if group["foreach"] else _stats_loop
                for owners, views in buckets(lists):
                    dists, gsqs = fn(*views, wd=group["weight_decay"], first=first, scratch=self._scratch,
                                     per_tensor=self.layer_wise)
                    if self.layer_wise:  # one partial sum per owner
                        units = [size + ids[o] for o in owners]
                        slots.extend(units)
                        slots.extend(u + n_units for u in units)
                    else:  # partial sums of the one group unit, however many
                        slots.extend([size] * len(dists))
                        slots.extend([size + 1] * len(gsqs))
                    parts.extend(dists)
                    parts.extend(gsqs)
            plan.append((group, active, first, ws, gs))
            size += 2 * n_units
        if device is None:
            device = next((p.device for g in self.param_groups for p in g["params"]), torch.device("cpu"))
        vals = pull_scattered(parts, slots, size, device, self._reducer)

        # Host: new distance, gradient sum and step size per unit.
        pos = 0
        for group, active, first, ws, gs in plan:
            n = len(group["params"]) if self.layer_wise else 1
            dist2, gsq = vals[pos:pos + n], vals[pos + n:pos + 2 * n]
            pos += 2 * n
            etas = self._update_unit_scalars(group, first, dist2, gsq)
            if not active:
                continue
            params = group["params"]
            for _, sub in by_device_dtype(len(active), lambda j: ws[active[j]]).items():
                ids = [active[j] for j in sub]
                ps, grads = [ws[i] for i in ids], [gs[i] for i in ids]
                fn = _update_loop
                if group["foreach"]:
                    # decided on the parameter's dtype: fused=True refuses bf16/fp16 as it does elsewhere
                    fused = use_fused(type(self).__name__, group.get("fused"), params[ids[0]]) and dense(ps, grads)
                    fn = _update_fused if fused else _update_foreach
                    if fused and _native.usable(group.get("fused"), ps, grads):
                        _native.run(_native.SGD_UPDATE, [ps, grads], [group["weight_decay"], etas[0]],
                                    per_tensor=[etas[i] for i in ids] if self.layer_wise else None)
                        continue
                for owners, (pv, gv) in buckets([ps, grads]):
                    fn(pv, gv, [etas[ids[o]] if self.layer_wise else etas[0] for o in owners],
                       wd=group["weight_decay"])
            _lowp.write_back([params[i] for i in active], [self.state[params[i]] for i in active])
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        _lowp.restore_fp32(self, state_dict, ("x0", "master"))

    def _update_unit_scalars(self, group: dict[str, Any], first: bool, dist2: list[float],
                             gsq: list[float]) -> list[float]:
        if first:
            rbar = [group["reps_rel"] * (1 + math.sqrt(x)) for x in dist2]
            G = [x + group["eps"] for x in gsq]
        else:
            rbar = [max(r, math.sqrt(x)) for r, x in zip(_as_list(group["rbar"]), dist2)]
            G = [a + x for a, x in zip(_as_list(group["G"]), gsq)]
        if not all(x > 0 for x in G):
            raise ValueError(f"{type(self).__name__}: the sum of squared gradients is not positive; "
                             f"raise eps={group['eps']!r} above 0 or make sure gradients reach the parameters")
        eta = [group["lr"] * r / math.sqrt(x) for r, x in zip(rbar, G)]
        if first and group["init_eta"] is not None:
            eta = [group["init_eta"]] * len(eta)
        one = not self.layer_wise
        group.update(rbar=rbar[0] if one else rbar, G=G[0] if one else G, eta=eta[0] if one else eta)
        return eta


class LDoG(DoG):
    """Layer-wise DoG: the DoG step size computed separately for every tensor."""

    layer_wise = True


def _as_list(x: Any) -> list[float]:
    return x if isinstance(x, list) else [x]


def _stats_foreach(ps: list[Tensor], gs: list[Tensor], x0s: list[Tensor], *, wd: float, first: bool,
                   scratch: Scratch, per_tensor: bool) -> tuple[list[Tensor], list[Tensor]]:
    gflat = None
    if wd != 0.0:  # L2 penalty, without touching p.grad
        gs, gflat = fresh(scratch, 0, torch._foreach_add, torch.add, gs, ps, alpha=wd)
    diffs, dflat = (ps, None) if first else fresh(scratch, 1, torch._foreach_sub, torch.sub, ps, x0s)
    return _sq(diffs, dflat, per_tensor), _sq(gs, gflat, per_tensor)


def _sq(xs: list[Tensor], flat: Optional[Tensor], per_tensor: bool) -> list[Tensor]:
    """Sums of squares: per tensor, or one for the bucket when the values tile a flat temporary
    (one reduction instead of one per tensor, and fewer partial sums to pull)."""
    if flat is not None and not per_tensor:
        return [dot(flat, flat)]
    return sumsq(xs)


def _stats_loop(ps: list[Tensor], gs: list[Tensor], x0s: list[Tensor], *, wd: float, first: bool,
                scratch: Scratch, per_tensor: bool) -> tuple[list[Tensor], list[Tensor]]:
    dists, gsqs = [], []
    for p, g, x0 in zip(ps, gs, x0s):
        if wd != 0.0:
            g = g.add(p, alpha=wd)
        diff = p if first else p - x0
        dists.append(dot(diff, diff))
        gsqs.append(dot(g, g))
    return dists, gsqs


def _update_fused(ps: list[Tensor], gs: list[Tensor], etas: list[float], *, wd: float) -> None:
    """p -= eta * (g + wd * p) in one pass: torch's fused SGD kernel (no momentum) is exactly this
    update, and it leaves the gradients alone without a grad_scale."""
    if len(set(etas)) == 1:
        _fused_sgd(ps, gs, etas[0], wd)
    else:  # LDoG: one step size per tensor
        for p, g, eta in zip(ps, gs, etas):
            _fused_sgd([p], [g], eta, wd)


def _fused_sgd(ps: list[Tensor], gs: list[Tensor], eta: float, wd: float) -> None:
    torch._fused_sgd_(ps, gs, [], weight_decay=wd, momentum=0.0, lr=eta, dampening=0.0, nesterov=False,
                      maximize=False, is_first_step=False)


def _update_foreach(ps: list[Tensor], gs: list[Tensor], etas: list[float], *, wd: float) -> None:
    if len(set(etas)) == 1:
        eta = etas[0]
        if wd != 0.0:  # p - eta * (g + wd * p), without a copy of the gradient
            torch._foreach_mul_(ps, 1.0 - eta * wd)
        torch._foreach_add_(ps, gs, alpha=-eta)
        return
    if wd != 0.0:
        torch._foreach_mul_(ps, [1.0 - e * wd for e in etas])
    if _common.cpu_layout(ps[0]):  # no fused kernels to win: skip the scaled copy of g
        for p, g, eta in zip(ps, gs, etas):
            p.add_(g, alpha=-eta)
    else:
        torch._foreach_add_(ps, torch._foreach_mul(gs, [-e for e in etas]))


def _update_loop(ps: list[Tensor], gs: list[Tensor], etas: list[float], *, wd: float) -> None:
    for p, g, eta in zip(ps, gs, etas):
        if wd != 0.0:
            p.mul_(1.0 - eta * wd)
        p.add_(g, alpha=-eta)
