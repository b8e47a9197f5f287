"""NAdamW: the AlgoPerf baseline. Adam with a Nesterov look-ahead on the first moment and decoupled weight decay.

    p <- p * (1 - lr * wd)
    m <- beta1 * m + (1 - beta1) * g;   v <- beta2 * v + (1 - beta2) * g^2
    p <- p - lr / (1 - beta1^t) * (beta1 * m + (1 - beta1) * g) / (sqrt(v / (1 - beta2^t)) + eps)

Unlike torch.optim.NAdam there is no momentum-decay schedule (mu_t = beta1).
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import Tensor

from ._common import KeepsExtras, ParamsT, Scratch, buckets, by_device_dtype, check_betas, check_range, fresh


class NAdamW(KeepsExtras, torch.optim.Optimizer):
    """NAdamW with AlgoPerf's update. Warm-up and decay come from the caller's LR scheduler."""

    def __init__(self, params: ParamsT, lr: float = 1e-3, *, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, foreach: bool = True) -> None:
        name = type(self).__name__
        check_range(name, "lr", lr, 0.0)
        betas = check_betas(name, betas)
        check_range(name, "eps", eps, 0.0)
        check_range(name, "weight_decay", weight_decay, 0.0)
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, foreach=foreach))
        self._scratch = Scratch()

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, wd = group["lr"], group["weight_decay"]
            # parameters sharing a step count share the bias corrections
            by_step: dict[int, list[Tensor]] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "step" not in state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                by_step.setdefault(state["step"], []).append(p)
            fn = _step_foreach if group["foreach"] else _step_loop
            for t, params in by_step.items():
                # sqrt(v / bc2) + eps = (sqrt(v) + eps * sqrt(bc2)) / sqrt(bc2): fold sqrt(bc2) into the step
                sbc = math.sqrt(1 - beta2 ** t)
                coefs = dict(decay=1 - lr * wd, beta1=beta1, beta2=beta2, eps=group["eps"] * sbc,
                             step=-lr / (1 - beta1 ** t) * sbc)
                for _, idx in by_device_dtype(len(params), lambda i: params[i]).items():
                    ps = [params[i] for i in idx]
                    sts = [self.state[p] for p in ps]
                    lists = [ps, [p.grad for p in ps], [s["exp_avg"] for s in sts], [s["exp_avg_sq"] for s in sts]]
                    for _, views in buckets(lists):
                        fn(*views, **coefs, scratch=self._scratch)
        return loss


def _step_foreach(ps: list[Tensor], gs: list[Tensor], ms: list[Tensor], vs: list[Tensor], *, decay: float,
                  beta1: float, beta2: float, eps: float, step: float, scratch: Scratch) -> None:
    if decay != 1.0:
        torch._foreach_mul_(ps, decay)
    torch._foreach_lerp_(ms, gs, 1 - beta1)
    torch._foreach_mul_(vs, beta2)
    torch._foreach_addcmul_(vs, gs, gs, value=1 - beta2)
    denom, _ = fresh(scratch, 0, torch._foreach_sqrt, torch.sqrt, vs)
    torch._foreach_add_(denom, eps)
    nesterov, _ = fresh(scratch, 1, torch._foreach_lerp, torch.lerp, gs, ms, weight=beta1)  # b1 m + (1 - b1) g
    torch._foreach_addcdiv_(ps, nesterov, denom, value=step)


def _step_loop(ps: list[Tensor], gs: list[Tensor], ms: list[Tensor], vs: list[Tensor], *, decay: float,
               beta1: float, beta2: float, eps: float, step: float, scratch: Scratch) -> None:
    for p, g, m, v in zip(ps, gs, ms, vs):
        if decay != 1.0:
            p.mul_(decay)
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        denom = v.sqrt().add_(eps)
        p.addcdiv_(torch.lerp(g, m, beta1), denom, value=step)
