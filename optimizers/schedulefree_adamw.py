"""Schedule-Free AdamW (Defazio et al., 2024): no LR schedule needed, matches schedulefree 1.4.1.

Differences that are not numerical: p.grad is never modified (the reference
divides it in place); the optimizer starts in train mode, so calling
``train()`` first is optional; work runs in cache-sized buckets on CPU.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import Tensor

from . import _native
from ._common import ParamsT, Scratch, buckets, by_device_dtype, check_betas, check_fused, check_range, fresh
from ._schedulefree import ScheduleFreeBase


class ScheduleFreeAdamW(ScheduleFreeBase):
    """Schedule-Free AdamW. Call ``optimizer.train()`` / ``optimizer.eval()`` with the model's.

    ``warmup_steps`` is a built-in linear warm-up; an external LR scheduler
    works as well (the averaging weight follows the scheduled lr). ``r`` and
    ``weight_lr_power`` shape the averaging weights (k+1)^r * lr_max^power.
    """

    _beta_key = "betas"

    def __init__(self, params: ParamsT, lr: float = 0.0025, *, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, warmup_steps: int = 0, r: float = 0.0,
                 weight_lr_power: float = 2.0, foreach: bool = True, fused: Optional[bool] = None) -> None:
        name = type(self).__name__
        check_fused(name, fused, foreach)
        check_range(name, "lr", lr, 0.0)
        betas = check_betas(name, betas)
        if betas[0] == 0.0:
            raise ValueError(f"{name}: invalid betas={betas!r}; beta1 must be in (0, 1) for the x/y interpolation")
        check_range(name, "eps", eps, 0.0)
        defaults = dict(lr=lr, betas=betas, eps=eps, foreach=foreach, fused=fused,
                        **self._schedule_defaults(name, weight_decay=weight_decay, warmup_steps=warmup_steps, r=r,
                                                  weight_lr_power=weight_lr_power))
        super().__init__(params, defaults)
        self._scratch = Scratch()

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:  # type: ignore[override]
        self._check_train_mode()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            k = group["k"]
            lr, ckp1 = self._advance(group)
            # sqrt(v / bc2) + eps = (sqrt(v) + eps * sqrt(bc2)) / sqrt(bc2): fold sqrt(bc2) into the step
            sbc = math.sqrt(1 - beta2 ** (k + 1))
            a = lr * (beta1 * (1 - ckp1) - 1)  # coefficient of the normalized gradient on y
            wd = group["weight_decay"]
            # z is updated first, then y is written in terms of the new z:
            #   y' = (1 - c + wd * b) y + c z' + b * g/denom,   b = a + c * lr
            b = a + ckp1 * lr
            coefs = dict(beta2=beta2, eps=group["eps"] * sbc, z_g=-lr * sbc, z_y=-lr * wd,
                         y_keep=1 - ckp1 + wd * b, ckp1=ckp1, y_g=b * sbc)
            params = [p for p in group["params"] if p.grad is not None]
            for p in params:
                state = self.state[p]
                if "z" not in state:
                    state["z"] = p.detach().clone(memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            fn = _step_foreach if group["foreach"] else _step_loop
            for _, idx in by_device_dtype(len(params), lambda i: params[i]).items():
                ps = [params[i] for i in idx]
                lists = [ps, [p.grad for p in ps], [self.state[p]["z"] for p in ps],
                         [self.state[p]["exp_avg_sq"] for p in ps]]
                if group["foreach"] and _native.usable(group.get("fused"), *lists):  # v, z and y in one pass
                    _native.run(_native.SFADAMW, lists, [
                        beta2, 1 - beta2, coefs["eps"], coefs["z_g"], coefs["z_y"], coefs["y_keep"], ckp1,
                        coefs["y_g"], float(coefs["y_keep"] == 1.0 - ckp1)])  # last: lerp form, as foreach
                    continue
                _native.refuse(type(self).__name__, group.get("fused"), ps[0])
                for _, views in buckets(lists):
                    fn(*views, **coefs, scratch=self._scratch)
            group["k"] = k + 1
        return loss


def _step_foreach(ys: list[Tensor], gs: list[Tensor], zs: list[Tensor], vs: list[Tensor], *, beta2: float,
                  eps: float, z_g: float, z_y: float, y_keep: float, ckp1: float, y_g: float,
                  scratch: Scratch) -> None:
    torch._foreach_mul_(vs, beta2)
    torch._foreach_addcmul_(vs, gs, gs, value=1 - beta2)
    denom, _ = fresh(scratch, 0, torch._foreach_sqrt, torch.sqrt, vs)
    torch._foreach_add_(denom, eps)
    if z_y != 0.0:
        torch._foreach_add_(zs, ys, alpha=z_y)  # decoupled decay, taken at y
    torch._foreach_addcdiv_(zs, gs, denom, value=z_g)
    if y_keep != 1.0 - ckp1:
        torch._foreach_mul_(ys, y_keep)
        torch._foreach_add_(ys, zs, alpha=ckp1)
    else:
        torch._foreach_lerp_(ys, zs, ckp1)
    torch._foreach_addcdiv_(ys, gs, denom, value=y_g)


def _step_loop(ys: list[Tensor], gs: list[Tensor], zs: list[Tensor], vs: list[Tensor], *, beta2: float,
               eps: float, z_g: float, z_y: float, y_keep: float, ckp1: float, y_g: float,
               scratch: Scratch) -> None:
    for y, g, z, v in zip(ys, gs, zs, vs):
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        denom = v.sqrt().add_(eps)
        if z_y != 0.0:
            z.add_(y, alpha=z_y)
        z.addcdiv_(g, denom, value=z_g)
        if y_keep != 1.0 - ckp1:
            y.mul_(y_keep).add_(z, alpha=ckp1)
        else:
            y.lerp_(z, ckp1)
        y.addcdiv_(g, denom, value=y_g)
