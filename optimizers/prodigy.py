"""Prodigy (Mishchenko & Defazio, 2023): Adam whose step size d is estimated online.

Matches prodigyopt 1.1.2 numerically. Differences that are not numerical:
the partial sums for d are computed on device and pulled to the host once per
step (the reference syncs once per parameter); with ``process_group`` or
``comm`` they are summed over workers every step on every worker, so a worker
whose gradients are all zero never skips the collective; groups with lr 0 are
left untouched (the reference still applies decoupled weight decay to them).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from . import _native
from ._common import (KeepsExtras, ParamsT, Reducer, Scratch, add_total, buckets, by_device_dtype, check_betas,
                      check_fused, check_range, check_same_across_groups, dense, dot, fresh, l1_total, local,
                      local_state, pull, scale_add_, sharded, sum_abs, use_fused)

# Settings that enter the single optimizer-wide d; they must agree across groups.
_SHARED = ("betas", "beta3", "d0", "d_coef", "growth_rate", "use_bias_correction",
           "safeguard_warmup", "decouple", "slice_p")


class Prodigy(KeepsExtras, torch.optim.Optimizer):
    """Adam with Prodigy's learning-rate-free step size.

    Leave ``lr`` at 1.0; an LR scheduler multiplies it as usual (every group
    must carry the same lr, or 0 to freeze it). ``d_coef`` is the knob to tune.
    Pass ``process_group`` or ``comm`` when each worker holds a different shard
    of the parameters (FSDP/ZeRO); not for replicated (DDP) parameters.
    ``fused`` (None: where supported) runs the statistics and the update as two
    native passes (optimizers/csrc) on contiguous float32/float64 CPU tensors,
    else the update as torch's fused Adam kernel; ``fused=False``: neither.
    """

    def __init__(self, params: ParamsT, lr: float = 1.0, *, betas: tuple[float, float] = (0.9, 0.999),
                 beta3: Optional[float] = None, eps: float = 1e-8, weight_decay: float = 0.0,
                 decouple: bool = True, use_bias_correction: bool = False,
                 safeguard_warmup: bool = False, d0: float = 1e-6, d_coef: float = 1.0,
                 growth_rate: float = math.inf, slice_p: int = 1, foreach: bool = True,
                 fused: Optional[bool] = None, process_group: Any = None, comm: Any = None) -> None:
        name = type(self).__name__
        check_range(name, "lr", lr, 0.0, lo_open=True)
        betas = check_betas(name, betas)
        if beta3 is not None:
            check_range(name, "beta3", beta3, 0.0, 1.0)
        check_range(name, "eps", eps, 0.0)
        check_range(name, "weight_decay", weight_decay, 0.0)
        check_range(name, "d0", d0, 0.0, lo_open=True)
        check_range(name, "d_coef", d_coef, 0.0, lo_open=True)
        check_range(name, "growth_rate", growth_rate, 1.0, hi_open=False)
        if not isinstance(slice_p, int) or isinstance(slice_p, bool) or slice_p < 1:
            raise ValueError(f"{name}: invalid slice_p={slice_p!r}; use an integer >= 1 (1 = exact Prodigy)")
        check_fused(name, fused, foreach)
        self._reducer = Reducer(name, process_group, comm)
        self._scratch = Scratch()
        defaults = dict(lr=lr, betas=betas, beta3=beta3, eps=eps, weight_decay=weight_decay,
                        decouple=decouple, use_bias_correction=use_bias_correction,
                        safeguard_warmup=safeguard_warmup, d0=d0, d_coef=d_coef,
                        growth_rate=growth_rate, slice_p=slice_p, foreach=foreach, fused=fused,
                        # optimizer-wide scalars, mirrored in every group so that
                        # state_dict() carries them
                        d=d0, d_max=d0, d_numerator=0.0, d_hat=d0, k=0)
        super().__init__(params, defaults)
        check_same_across_groups(name, self.param_groups, _SHARED)

    def _init_state(self, p: Tensor, beta1: float, slice_p: int) -> dict[str, Tensor]:
        state = self.state[p]
        if "exp_avg_sq" not in state:
            if slice_p != 1 and sharded(p):
                raise ValueError(f"{type(self).__name__}: slice_p={slice_p} needs whole parameters; sharded (DTensor) "
                                 "parameters take slice_p=1")
            sl = _sliced(p.detach(), slice_p)
            state["s"] = torch.zeros_like(sl)
            # an all-zero start (typical for biases) is stored as a 0-dim zero (never for a sharded
            # parameter: its shards would disagree on the form of its state)
            state["p0"] = sl.clone() if sharded(p) or bool(p.any()) else torch.zeros((), dtype=p.dtype, device=p.device)
            if beta1 > 0:
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        g0 = self.param_groups[0]
        beta1, beta2 = g0["betas"]
        beta3 = g0["beta3"] if g0["beta3"] is not None else math.sqrt(beta2)
        k, d, d0, d_max = g0["k"], g0["d"], g0["d0"], g0["d_max"]
        lr = max(g["lr"] for g in self.param_groups)
        for g in self.param_groups:
            if g["lr"] not in (lr, 0.0):
                raise ValueError(f"{type(self).__name__}: invalid lr={g['lr']!r} in a param group; every group "
                                 f"must use the same lr ({lr!r}) or 0 to freeze it")
        bc = math.sqrt(1 - beta2 ** (k + 1)) / (1 - beta1 ** (k + 1)) if g0["use_bias_correction"] else 1.0
        dlr = d * lr * bc
        slice_p = g0["slice_p"]
        # coefficients of the moment updates (d / d0 keeps the sums away from tiny values)
        s_coef = (d / d0) * (d if g0["safeguard_warmup"] else dlr)
        coefs = (beta1, d * (1 - beta1), beta2, d * d * (1 - beta2), beta3, s_coef)

        # (group, params, grads, states, kind) per group with lr > 0 and (device, dtype);
        # kind: "native" (our C passes), "fused" (torch's fused Adam) or "plain"
        work = []
        for group in self.param_groups:
            if group["lr"] == 0.0:
                continue
            params = [p for p in group["params"] if p.grad is not None]
            for _, idx in by_device_dtype(len(params), lambda i: params[i]).items():
                # shards of DTensor parameters (FSDP2): the sums below are completed by the reducer
                sts = [local_state(self._init_state(params[i], beta1, slice_p)) for i in idx]
                ps = [local(params[i]) for i in idx]
                # fused Adam needs a first moment to write into (beta1 == 0 keeps the foreach path)
                gs = [local(params[i].grad) for i in idx]
                fused = (group["foreach"] and beta1 > 0 and use_fused(type(self).__name__, group.get("fused"), ps[0])
                         and dense(ps, gs, [s["exp_avg"] for s in sts], [s["exp_avg_sq"] for s in sts]))
                # native: the statistics and then the whole Adam update as two passes, reading g directly
                native = fused and slice_p == 1 and _native.usable(
                    group.get("fused"), ps, gs, *[[s[k] for s in sts] for k in ("exp_avg", "exp_avg_sq", "s")],
                    [s["p0"] if s["p0"].dim() else None for s in sts])
                work.append((group, ps, gs, sts, "native" if native else "fused" if fused else "plain"))

        num_parts: list[Tensor] = []
        den_parts: list[Tensor] = []
        for group, ps, gs, sts, kind in work:
            wd = group["weight_decay"] if not group["decouple"] else 0.0
            lists = [ps, gs, [s["exp_avg"] for s in sts] if beta1 > 0 else ps,
                     [s["exp_avg_sq"] for s in sts], [s["s"] for s in sts], [s["p0"] for s in sts]]
            if kind == "native":  # p0 = None: the parameter started at zero
                sums = _native.run(_native.PRODIGY_STATS, [ps, gs, lists[4], [p0 if p0.dim() else None
                                                                              for p0 in lists[5]]],
                                   [wd, coefs[4], coefs[5]], nred=2).sum(0)
                num_parts.append(sums[0])
                den_parts.append(sums[1])
                continue
            fn = _stats_foreach if group["foreach"] else _stats_loop
            for _, views in buckets(lists, limit=None if slice_p == 1 else 0):
                fn(*views, wd=wd, coefs=coefs, slice_p=slice_p, num_parts=num_parts, den_parts=den_parts,
                   scratch=self._scratch, fused=kind == "fused")
        device = work[0][1][0].device if work else next(
            (p.device for g in self.param_groups for p in g["params"]), torch.device("cpu"))
        delta_num, den = pull([add_total(num_parts, device), add_total(den_parts, device)], device, self._reducer)
        if den == 0.0:
            # no gradient signal anywhere yet: nothing to learn d from, nothing to step
            return loss
        d_num = g0["d_numerator"] * beta3 + (d / d0) * dlr * delta_num
        d_hat = g0["d_coef"] * d_num / den
        new_d = max(d, d_hat) if d == d0 else d
        d_max = max(d_max, d_hat)
        new_d = min(d_max, new_d * g0["growth_rate"])
        for group in self.param_groups:
            group.update(d=new_d, d_max=d_max, d_numerator=d_num, d_hat=d_hat, k=k + 1)

        for group, ps, gs, sts, kind in work:
            wd = group["weight_decay"]
            lists = [ps, gs, [s["exp_avg"] for s in sts] if beta1 > 0 else ps, [s["exp_avg_sq"] for s in sts]]
            if kind == "native":
                _native.run(_native.PRODIGY_UPDATE, lists, [
                    0.0 if group["decouple"] else wd, beta1, coefs[1], beta2, coefs[3], new_d * group["eps"],
                    wd * dlr if group["decouple"] else 0.0, dlr])
                continue
            if kind == "fused":
                for _, views in buckets(lists):
                    _update_fused(*views, d=d, dlr=dlr, betas=(beta1, beta2), eps=new_d * group["eps"],
                                  wd=wd, decouple=group["decouple"], scratch=self._scratch)
                continue
            decay = wd * dlr if group["decouple"] else 0.0
            coupled = wd if not group["decouple"] else 0.0
            fn = _update_foreach if group["foreach"] else _update_loop
            for _, views in buckets(lists):
                fn(*views, eps=new_d * group["eps"], decay=decay, coupled=coupled,
                   alpha=dlr if beta1 > 0 else None, grad_alpha=dlr * new_d, scratch=self._scratch)
        return loss


def _sliced(t: Tensor, slice_p: int) -> Tensor:
    """Every slice_p-th entry (the statistics for d may be estimated on a subsample)."""
    return t if slice_p == 1 else t.reshape(-1)[::slice_p]


def _stats_foreach(ps: list[Tensor], gs: list[Tensor], ms: list[Tensor], vs: list[Tensor],
                   ss: list[Tensor], p0s: list[Tensor], *, wd: float, coefs: tuple[float, ...],
                   slice_p: int, num_parts: list[Tensor], den_parts: list[Tensor], scratch: Scratch,
                   fused: bool) -> None:
    b1, c1, b2, c2, b3, c3 = coefs
    if wd != 0.0:  # coupled decay, without touching p.grad
        gs, _ = fresh(scratch, 0, torch._foreach_add, torch.add, gs, ps, alpha=wd)
    gsl = [_sliced(g, slice_p) for g in gs]
    psl = [_sliced(p, slice_p) for p in ps]
    full = [i for i, p0 in enumerate(p0s) if p0.shape == psl[i].shape]
    if full:  # numerator terms g . (p0 - p), with p0 - p formed in scratch
        diff, _ = fresh(scratch, 1, torch._foreach_sub, torch.sub, [p0s[i] for i in full], [psl[i] for i in full])
        num_parts.extend(dot(gsl[i], d) for i, d in zip(full, diff))
    if len(full) < len(p0s):  # parameters that started at zero: p0 = 0
        num_parts.extend(-dot(gsl[i], psl[i]) for i, p0 in enumerate(p0s) if p0.shape != psl[i].shape)
    if not fused:  # else the fused Adam kernel updates them after d
        if b1 > 0:
            torch._foreach_mul_(ms, b1)
            torch._foreach_add_(ms, gs, alpha=c1)
        torch._foreach_mul_(vs, b2)
        torch._foreach_addcmul_(vs, gs, gs, value=c2)
    scale_add_(ss, gsl, b3, c3, fused=fused)
    den_parts.extend(l1_total(scratch, ss, 1))


def _stats_loop(ps: list[Tensor], gs: list[Tensor], ms: list[Tensor], vs: list[Tensor],
                ss: list[Tensor], p0s: list[Tensor], *, wd: float, coefs: tuple[float, ...],
                slice_p: int, num_parts: list[Tensor], den_parts: list[Tensor], scratch: Scratch,
                fused: bool) -> None:
    b1, c1, b2, c2, b3, c3 = coefs
    for p, g, m, v, s, p0 in zip(ps, gs, ms, vs, ss, p0s):
        if wd != 0.0:
            g = g.add(p, alpha=wd)
        gsl, psl = _sliced(g, slice_p), _sliced(p, slice_p)
        num_parts.append(dot(gsl, p0 - psl) if p0.shape == psl.shape else -dot(gsl, psl))
        if b1 > 0:
            m.mul_(b1).add_(g, alpha=c1)
        v.mul_(b2).addcmul_(g, g, value=c2)
        s.mul_(b3).add_(gsl, alpha=c3)
        den_parts.extend(sum_abs([s]))


def _update_fused(ps: list[Tensor], gs: list[Tensor], ms: list[Tensor], vs: list[Tensor], *, d: float,
                  dlr: float, betas: tuple[float, float], eps: float, wd: float, decouple: bool,
                  scratch: Scratch) -> None:
    """Moments and parameters in one fused Adam pass: Prodigy's update is Adam on the gradient d * g
    with step dlr and eps d' * eps, its bias correction already in dlr (the kernel's is switched off)."""
    dg, _ = scratch.like(gs, 0)  # d * g in a cache-resident temporary: p.grad stays untouched
    torch.ops.aten._foreach_mul.Scalar_out(gs, d, out=dg)
    # coupled decay: the kernel's L2 term wd' * p with wd' = d * wd gives d * (g + wd * p)
    kernel = torch._fused_adamw_ if decouple else torch._fused_adam_
    kernel(ps, dg, ms, vs, [], scratch.no_bias_correction_steps(ps[0].device, len(ps)), lr=dlr,
           beta1=betas[0], beta2=betas[1], weight_decay=wd if decouple else d * wd, eps=eps,
           amsgrad=False, maximize=False)


def _update_foreach(ps: list[Tensor], gs: list[Tensor], ms: list[Tensor], vs: list[Tensor], *,
                    eps: float, decay: float, coupled: float, alpha: Optional[float],
                    grad_alpha: float, scratch: Scratch) -> None:
    denom, _ = fresh(scratch, 0, torch._foreach_sqrt, torch.sqrt, vs)
    torch._foreach_add_(denom, eps)
    if alpha is None:  # beta1 == 0: step along the (decayed) gradient itself
        if coupled:
            ms, _ = fresh(scratch, 1, torch._foreach_add, torch.add, gs, ps, alpha=coupled)
        else:
            ms = gs
        alpha = grad_alpha
    if decay != 0.0:
        torch._foreach_mul_(ps, 1.0 - decay)
    torch._foreach_addcdiv_(ps, ms, denom, value=-alpha)


def _update_loop(ps: list[Tensor], gs: list[Tensor], ms: list[Tensor], vs: list[Tensor], *,
                 eps: float, decay: float, coupled: float, alpha: Optional[float],
                 grad_alpha: float, scratch: Scratch) -> None:
    for p, g, m, v in zip(ps, gs, ms, vs):
        denom = v.sqrt().add_(eps)
        step, a = (m, alpha) if alpha is not None else ((g.add(p, alpha=coupled) if coupled else g), grad_alpha)
        if decay != 0.0:
            p.mul_(1.0 - decay)
        p.addcdiv_(step, denom, value=-a)
