"""D-Adaptation Adam (Defazio & Mishchenko, 2023): Adam with an online estimate d of the distance to the solution.

Matches dadaptation 3.2 numerically. The step never waits for the new d (it
only scales the next step), so statistics and the parameter update run in one
pass over each cache-sized bucket. With ``process_group`` or ``comm`` the two
partial sums are reduced on every worker every step: the reference returns
before its all-reduce on a worker whose gradients are all zero, and hangs.
Where every gradient so far has been zero the reference skips decoupled weight
decay for that step; here it is applied like any other step.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from . import _native
from ._common import (KeepsExtras, ParamsT, Reducer, Scratch, add_total, buckets, by_device_dtype, check_betas,
                      check_fused, check_range, check_same_across_groups, dot, fresh, l1_total, local, local_state, pull,
                      scale_add_,
                      sum_abs, use_fused)

_SHARED = ("betas", "use_bias_correction", "decouple", "growth_rate", "d0")


class DAdaptAdam(KeepsExtras, torch.optim.Optimizer):
    """Adam with D-Adaptation step sizes. Leave ``lr`` at 1.0.

    ``layer_scale`` (per group) multiplies that group's step relative to the
    others, since every group must carry the same lr (or 0 to freeze it).
    ``weight_decay`` is an L2 penalty unless ``decouple=True`` (AdamW style).
    ``fused`` (None: where supported) runs the whole step as one native pass
    (optimizers/csrc) on contiguous float32/float64 CPU tensors, else updates
    m and s with torch's fused SGD kernel; ``fused=False`` uses neither.
    """

    def __init__(self, params: ParamsT, lr: float = 1.0, *, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, decouple: bool = False,
                 use_bias_correction: bool = False, d0: float = 1e-6, growth_rate: float = math.inf,
                 layer_scale: float = 1.0, foreach: bool = True, fused: Optional[bool] = None,
                 process_group: Any = None, comm: Any = None) -> None:
        name = type(self).__name__
        check_fused(name, fused, foreach)
        check_range(name, "lr", lr, 0.0, lo_open=True)
        betas = check_betas(name, betas)
        check_range(name, "eps", eps, 0.0)
        check_range(name, "weight_decay", weight_decay, 0.0)
        check_range(name, "d0", d0, 0.0, lo_open=True)
        check_range(name, "growth_rate", growth_rate, 1.0, hi_open=False)
        check_range(name, "layer_scale", layer_scale, 0.0, lo_open=True)
        self._reducer = Reducer(name, process_group, comm)
        self._scratch = Scratch()
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, decouple=decouple,
                        use_bias_correction=use_bias_correction, d0=d0, growth_rate=growth_rate,
                        layer_scale=layer_scale, foreach=foreach, fused=fused,
                        d=d0, k=0, numerator_weighted=0.0)  # optimizer-wide, mirrored per group
        super().__init__(params, defaults)
        check_same_across_groups(name, self.param_groups, _SHARED)

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        g0 = self.param_groups[0]
        beta1, beta2 = g0["betas"]
        k, d = g0["k"], g0["d"]
        lr = max(g["lr"] for g in self.param_groups)
        for g in self.param_groups:
            if g["lr"] not in (lr, 0.0):
                raise ValueError(f"{type(self).__name__}: invalid lr={g['lr']!r} in a param group; every group "
                                 f"must use the same lr ({lr!r}) or 0 to freeze it (use layer_scale to scale a group)")
        bc = math.sqrt(1 - beta2 ** (k + 1)) / (1 - beta1 ** (k + 1)) if g0["use_bias_correction"] else 1.0
        dlr = d * lr * bc
        sb2 = math.sqrt(beta2)

        num_parts: list[Tensor] = []
        den_parts: list[Tensor] = []
        device = None
        for group in self.param_groups:
            if group["lr"] == 0.0:
                continue
            params = [p for p in group["params"] if p.grad is not None]
            r = group["layer_scale"]
            wd = group["weight_decay"]
            opts = dict(eps=group["eps"], coupled=0.0 if group["decouple"] else wd,
                        decay=wd * dlr if group["decouple"] else 0.0,
                        coefs=(beta1, r * dlr * (1 - beta1), beta2, 1 - beta2, sb2, dlr * (1 - sb2)))
            fn = _step_foreach if group["foreach"] else _step_loop
            for (dev, _), idx in by_device_dtype(len(params), lambda i: params[i]).items():
                device = dev
                # shards of DTensor parameters (FSDP2): the sums below are completed by the reducer
                sts = [local_state(self._state(params[i])) for i in idx]
                ps = [local(params[i]) for i in idx]
                lists = [ps, [local(params[i].grad) for i in idx], [s["exp_avg"] for s in sts],
                         [s["exp_avg_sq"] for s in sts], [s["s"] for s in sts]]
                n0, m0 = len(num_parts), len(den_parts)
                fused = group["foreach"] and use_fused(type(self).__name__, group.get("fused"), ps[0])
                if fused and _native.usable(group.get("fused"), *lists):  # the whole step in one pass
                    sums = _native.run(_native.DADAPT_ADAM, lists, [opts["eps"], opts["coupled"], opts["decay"],
                                                                    *opts["coefs"]], nred=2).sum(0)
                    num_parts.append(sums[0])
                    den_parts.append(sums[1])
                else:
                    for _, views in buckets(lists):
                        fn(*views, **opts, num_parts=num_parts, den_parts=den_parts, scratch=self._scratch,
                           fused=fused)
                if r != 1.0:  # layer_scale weighs this group's share of both sums
                    num_parts[n0:] = [x * r for x in num_parts[n0:]]
                    den_parts[m0:] = [x * r for x in den_parts[m0:]]
        if device is None:
            device = next((p.device for g in self.param_groups for p in g["params"]), torch.device("cpu"))
        num, den = pull([add_total(num_parts, device), add_total(den_parts, device)], device, self._reducer)
        if den == 0.0:
            return loss  # no gradient signal anywhere yet: d and k stay
        nw = sb2 * g0["numerator_weighted"] + (1 - sb2) * dlr * num
        d_hat = nw / ((1 - sb2) * den)
        d = max(d, min(d_hat, d * g0["growth_rate"]))
        for group in self.param_groups:
            group.update(numerator_weighted=nw, d=d, d_hat=d_hat, k=k + 1)
        return loss

    def _state(self, p: Tensor) -> dict[str, Tensor]:
        state = self.state[p]
        if "s" not in state:
            for key in ("s", "exp_avg", "exp_avg_sq"):
                state[key] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state


def _step_foreach(ps: list[Tensor], gs: list[Tensor], ms: list[Tensor], vs: list[Tensor],
                  ss: list[Tensor], *, eps: float, coupled: float, decay: float,
                  coefs: tuple[float, ...], num_parts: list[Tensor], den_parts: list[Tensor],
                  scratch: Scratch, fused: bool) -> None:
    b1, c1, b2, c2, b3, c3 = coefs
    if coupled != 0.0:  # L2 penalty, without touching p.grad
        gs, _ = fresh(scratch, 0, torch._foreach_add, torch.add, gs, ps, alpha=coupled)
    denom, _ = fresh(scratch, 1, torch._foreach_sqrt, torch.sqrt, vs)
    torch._foreach_add_(denom, eps)
    q, _ = fresh(scratch, 2, torch._foreach_div, torch.div, ss, denom)  # s / denom at the old second moment
    num_parts.extend(dot(g, x) for g, x in zip(gs, q))
    scale_add_(ms, gs, b1, c1, fused=fused)
    torch._foreach_mul_(vs, b2)
    torch._foreach_addcmul_(vs, gs, gs, value=c2)
    scale_add_(ss, gs, b3, c3, fused=fused)
    den_parts.extend(l1_total(scratch, ss, 2))
    denom, _ = fresh(scratch, 1, torch._foreach_sqrt, torch.sqrt, vs)
    torch._foreach_add_(denom, eps)
    if decay != 0.0:
        torch._foreach_mul_(ps, 1.0 - decay)
    torch._foreach_addcdiv_(ps, ms, denom, value=-1.0)


def _step_loop(ps: list[Tensor], gs: list[Tensor], ms: list[Tensor], vs: list[Tensor],
               ss: list[Tensor], *, eps: float, coupled: float, decay: float,
               coefs: tuple[float, ...], num_parts: list[Tensor], den_parts: list[Tensor],
               scratch: Scratch, fused: bool) -> None:
    b1, c1, b2, c2, b3, c3 = coefs
    for p, g, m, v, s in zip(ps, gs, ms, vs, ss):
        if coupled != 0.0:
            g = g.add(p, alpha=coupled)
        num_parts.append(dot(g, s / v.sqrt().add_(eps)))
        m.mul_(b1).add_(g, alpha=c1)
        v.mul_(b2).addcmul_(g, g, value=c2)
        s.mul_(b3).add_(g, alpha=c3)
        den_parts.extend(sum_abs([s]))
        if decay != 0.0:
            p.mul_(1.0 - decay)
        p.addcdiv_(m, v.sqrt().add_(eps), value=-1.0)
