"""Schedule-Free SGD (Defazio et al., 2024): no LR schedule needed, matches schedulefree 1.4.1.

Differences that are not numerical: p.grad is never modified (the reference
adds weight decay to it in place); the optimizer starts in train mode; work
runs in cache-sized buckets on CPU.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from . import _native
from ._common import ParamsT, Scratch, buckets, by_device_dtype, check_fused, check_range, fresh
from ._schedulefree import ScheduleFreeBase


class ScheduleFreeSGD(ScheduleFreeBase):
    """Schedule-Free SGD. Call ``optimizer.train()`` / ``optimizer.eval()`` with the model's.

    ``momentum`` is the interpolation constant between z and x (0.9 is the
    published default); ``weight_decay`` is an L2 penalty taken at y.
    ``fused`` (None: where supported) runs the step as one native pass
    (optimizers/csrc) on contiguous float32/float64 CPU tensors; ``fused=False``
    keeps the foreach path; ``fused=True`` insists on the native pass.
    """

    _beta_key = "momentum"

    def __init__(self, params: ParamsT, lr: float = 1.0, *, momentum: float = 0.9, weight_decay: float = 0.0,
                 warmup_steps: int = 0, r: float = 0.0, weight_lr_power: float = 2.0,
                 foreach: bool = True, fused: Optional[bool] = None) -> None:
        name = type(self).__name__
        check_fused(name, fused, foreach)
        check_range(name, "lr", lr, 0.0)
        check_range(name, "momentum", momentum, 0.0, 1.0, lo_open=True)
        defaults = dict(lr=lr, momentum=momentum, foreach=foreach, fused=fused,
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
            lr, ckp1 = self._advance(group)
            a = lr * (group["momentum"] * (1 - ckp1) - 1)
            # with n = g + wd * y: z' = z - lr n and y' = lerp(y, z, c) + a n = lerp(y, z', c) + (a + c lr) n
            coefs = dict(wd=group["weight_decay"], lr=lr, ckp1=ckp1, y_n=a + ckp1 * lr)
            params = [p for p in group["params"] if p.grad is not None]
            for p in params:
                if "z" not in self.state[p]:
                    self.state[p]["z"] = p.detach().clone(memory_format=torch.preserve_format)
            fn = _step_foreach if group["foreach"] else _step_loop
            for _, idx in by_device_dtype(len(params), lambda i: params[i]).items():
                ps = [params[i] for i in idx]
                lists = [ps, [p.grad for p in ps], [self.state[p]["z"] for p in ps]]
                if group["foreach"] and _native.usable(group.get("fused"), *lists):  # y and z in one pass
                    _native.run(_native.SFSGD, lists, [coefs["wd"], coefs["lr"], coefs["ckp1"], coefs["y_n"]])
                    continue
                _native.refuse(type(self).__name__, group.get("fused"), ps[0])
                for _, views in buckets(lists):
                    fn(*views, **coefs, scratch=self._scratch)
            group["k"] += 1
        return loss


def _step_foreach(ys: list[Tensor], gs: list[Tensor], zs: list[Tensor], *, wd: float, lr: float,
                  ckp1: float, y_n: float, scratch: Scratch) -> None:
    ns = fresh(scratch, 0, torch._foreach_add, torch.add, gs, ys, alpha=wd)[0] if wd != 0.0 else gs
    torch._foreach_add_(zs, ns, alpha=-lr)
    torch._foreach_lerp_(ys, zs, ckp1)
    torch._foreach_add_(ys, ns, alpha=y_n)


def _step_loop(ys: list[Tensor], gs: list[Tensor], zs: list[Tensor], *, wd: float, lr: float,
               ckp1: float, y_n: float, scratch: Scratch) -> None:
    for y, g, z in zip(ys, gs, zs):
        n = g.add(y, alpha=wd) if wd != 0.0 else g
        z.add_(n, alpha=-lr)
        y.lerp_(z, ckp1)
        y.add_(n, alpha=y_n)
