"""D-Adaptation SGD (Defazio & Mishchenko, 2023): dual-averaging SGD with an online distance estimate d.

Matches dadaptation 3.2 numerically where the reference is well defined.
Differences: each group's own ``weight_decay`` is used (the reference applies
the first group's to every group, and leaves it out of the initial gradient
norm, as here); with momentum 0 the iterate x0 - s is kept in the parameter
itself, so the only state is s (the reference keeps s, z and x0); zero
gradients skip the step instead of dividing by zero; with ``process_group`` or
``comm`` every worker enters every reduction.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from ._common import (KeepsExtras, ParamsT, Reducer, Scratch, add_total, buckets, by_device_dtype,
                      check_range, check_same_across_groups, dot, fresh, local, local_state, pull, sumsq)

_SHARED = ("growth_rate", "d0")


class DAdaptSGD(KeepsExtras, torch.optim.Optimizer):
    """SGD with D-Adaptation step sizes. Leave ``lr`` at 1.0.

    ``momentum`` averages the iterate towards the dual-averaging point
    (x <- momentum * x + (1 - momentum) * z); ``weight_decay`` is an L2 penalty.
    """

    def __init__(self, params: ParamsT, lr: float = 1.0, *, momentum: float = 0.0,
                 weight_decay: float = 0.0, d0: float = 1e-6, growth_rate: float = math.inf,
                 foreach: bool = True, process_group: Any = None, comm: Any = None) -> None:
        name = type(self).__name__
        check_range(name, "lr", lr, 0.0, lo_open=True)
        check_range(name, "momentum", momentum, 0.0, 1.0)
        check_range(name, "weight_decay", weight_decay, 0.0)
        check_range(name, "d0", d0, 0.0, lo_open=True)
        check_range(name, "growth_rate", growth_rate, 1.0, hi_open=False)
        self._reducer = Reducer(name, process_group, comm)
        self._scratch = Scratch()
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, d0=d0,
                        growth_rate=growth_rate, foreach=foreach,
                        d=d0, k=0, numerator_weighted=0.0, g0_norm=None)  # optimizer-wide
        super().__init__(params, defaults)
        check_same_across_groups(name, self.param_groups, _SHARED)

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        g0 = self.param_groups[0]
        lr = max(g["lr"] for g in self.param_groups)
        for g in self.param_groups:
            if g["lr"] not in (lr, 0.0):
                raise ValueError(f"{type(self).__name__}: invalid lr={g['lr']!r} in a param group; every group "
                                 f"must use the same lr ({lr!r}) or 0 to freeze it")
        active = []
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None] if group["lr"] != 0.0 else []
            if params:
                active.append((group, params))
        device = next((p.device for _, ps in active for p in ps),
                      next((p.device for g in self.param_groups for p in g["params"]), torch.device("cpu")))

        g0_norm = g0["g0_norm"]
        if g0_norm is None:  # first step: the raw gradient norm fixes the scale of d
            parts = [x for _, ps in active for x in sumsq([local(p.grad) for p in ps])]
            (gsq,) = pull([add_total(parts, device)], device, self._reducer)
            if gsq == 0.0:
                return loss  # nothing to scale by yet; try again next step
            g0_norm = math.sqrt(gsq)
            for group in self.param_groups:
                group["g0_norm"] = g0_norm
        d = g0["d"]
        dlr = d * lr / g0_norm

        num_parts: list[Tensor] = []
        den_parts: list[Tensor] = []
        for group, params in active:
            fn = _step_foreach if group["foreach"] else _step_loop
            momentum = group["momentum"]
            for _, idx in by_device_dtype(len(params), lambda i: params[i]).items():
                # shards of DTensor parameters (FSDP2): the sums below are completed by the reducer
                sts = [local_state(self._state(params[i], momentum)) for i in idx]
                ps = [local(params[i]) for i in idx]
                lists = [ps, [local(params[i].grad) for i in idx], [s["s"] for s in sts]]
                if momentum > 0:
                    lists.append([s["z"] for s in sts])
                for _, views in buckets(lists):
                    zs = views[3] if momentum > 0 else None
                    fn(*views[:3], zs, wd=group["weight_decay"], dlr=dlr, momentum=momentum,
                       num_parts=num_parts, den_parts=den_parts, scratch=self._scratch)
        num, den = pull([add_total(num_parts, device), add_total(den_parts, device)], device, self._reducer)
        if den == 0.0:
            return loss
        nw = g0["numerator_weighted"] + dlr * num
        d_hat = 2 * nw / math.sqrt(den)
        d = max(d, min(d_hat, d * g0["growth_rate"]))
        for group in self.param_groups:
            group.update(numerator_weighted=nw, d=d, d_hat=d_hat, k=g0["k"] + 1)
        return loss

    def _state(self, p: Tensor, momentum: float) -> dict[str, Tensor]:
        state = self.state[p]
        if "s" not in state:
            state["s"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if momentum > 0 and "z" not in state:
            # z = x0 - s; with momentum 0 the parameter itself is z
            state["z"] = p.detach().clone(memory_format=torch.preserve_format) - state["s"]
        return state


def _step_foreach(ps: list[Tensor], gs: list[Tensor], ss: list[Tensor], zs: Optional[list[Tensor]], *,
                  wd: float, dlr: float, momentum: float, num_parts: list[Tensor],
                  den_parts: list[Tensor], scratch: Scratch) -> None:
    if wd != 0.0:  # L2 penalty, without touching p.grad
        gs, _ = fresh(scratch, 0, torch._foreach_add, torch.add, gs, ps, alpha=wd)
    num_parts.extend(dot(g, s) for g, s in zip(gs, ss))
    torch._foreach_add_(ss, gs, alpha=dlr)
    den_parts.extend(sumsq(ss))
    if zs is None:
        torch._foreach_add_(ps, gs, alpha=-dlr)
    else:
        torch._foreach_add_(zs, gs, alpha=-dlr)
        torch._foreach_lerp_(ps, zs, 1.0 - momentum)


def _step_loop(ps: list[Tensor], gs: list[Tensor], ss: list[Tensor], zs: Optional[list[Tensor]], *,
               wd: float, dlr: float, momentum: float, num_parts: list[Tensor],
               den_parts: list[Tensor], scratch: Scratch) -> None:
    for i, (p, g, s) in enumerate(zip(ps, gs, ss)):
        if wd != 0.0:
            g = g.add(p, alpha=wd)
        num_parts.append(dot(g, s))
        s.add_(g, alpha=dlr)
        den_parts.append(dot(s, s))
        if zs is None:
            p.add_(g, alpha=-dlr)
        else:
            zs[i].add_(g, alpha=-dlr)
            p.lerp_(zs[i], 1.0 - momentum)
