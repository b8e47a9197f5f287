"""Mechanic (Cutkosky, Defazio & Mehta, 2023): learns a global scale s for any base optimizer's updates.

x_t = x_ref + s_t * Delta_t, where Delta accumulates the base optimizer's
updates and s is set by a small online-learning tuner (one coordinate per
beta). Matches mechanic-pytorch 0.0.1 numerically, including its default of
recomputing Delta from the parameters (``store_delta=False``; ``True`` keeps
Delta as state, the paper's algorithm).

Differences that are not numerical: gradients are read before the base step
instead of cloned; the tuner state (a few floats) lives on the host, so the
step pulls one small vector to the host once; with ``process_group`` or
``comm`` the inner products are summed over workers that hold different shards
of the parameters, on every worker every step.

bfloat16/float16 parameters: x_ref + s * Delta with a small s rounds back to x_ref,
so Mechanic keeps float32 ref/Delta and a float32 master of x (state "master"); the
base optimizer steps the parameter itself, its move is added to the master, and the
Mechanic update is computed in float32 and rounded into the parameter.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor

from . import _common, _lowp
from ._common import (KeepsExtras, ParamsT, Reducer, add_total, bad, buckets, by_device_dtype, check_range,
                      dot, pull, sumsq)

_DEFAULT_BETAS = (0.9, 0.99, 0.999, 0.9999, 0.99999, 0.999999)


class Mechanic(KeepsExtras, torch.optim.Optimizer):
    """Wraps a base optimizer and tunes the scale of its updates.

    ``Mechanic(params, base=torch.optim.AdamW, base_kwargs={"lr": 1e-3})``
    builds the base optimizer; ``Mechanic(existing_optimizer)`` wraps one.
    ``param_groups`` are the base optimizer's own, so LR schedulers act on the
    base learning rate as usual.
    """

    def __init__(self, params: Union[ParamsT, torch.optim.Optimizer], lr: Optional[float] = None, *,
                 base: Optional[Callable[..., torch.optim.Optimizer]] = None,
                 base_kwargs: Optional[dict[str, Any]] = None, s_decay: float = 0.01,
                 betas: tuple[float, ...] = _DEFAULT_BETAS, s_init: float = 1e-8, eps: float = 1e-8,
                 store_delta: bool = False, foreach: bool = True, process_group: Any = None,
                 comm: Any = None) -> None:
        name = type(self).__name__
        check_range(name, "s_decay", s_decay, 0.0)
        check_range(name, "s_init", s_init, 0.0, lo_open=True)
        check_range(name, "eps", eps, 0.0, lo_open=True)
        try:
            betas = tuple(float(b) for b in betas)
        except TypeError:
            raise bad(name, "betas", betas, "pass a tuple of numbers in [0, 1)") from None
        if not betas or not all(0.0 <= b < 1.0 for b in betas):
            raise bad(name, "betas", betas, "pass a non-empty tuple of numbers in [0, 1)")
        if lr is not None:  # the base optimizer's lr, positional as in torch.optim
            if isinstance(params, torch.optim.Optimizer) or "lr" in (base_kwargs or {}):
                raise bad(name, "lr", lr, "give lr once: positionally, or in base_kwargs, or to the wrapped optimizer")
            base_kwargs = {**(base_kwargs or {}), "lr": lr}
        if isinstance(params, torch.optim.Optimizer):
            if base is not None or base_kwargs:
                raise bad(name, "base", base, "leave base and base_kwargs unset when wrapping an existing optimizer")
            inner = params
        else:
            factory = base if base is not None else torch.optim.AdamW
            if not callable(factory):
                raise bad(name, "base", base, "pass an optimizer class such as torch.optim.AdamW")
            inner = factory(params, **(base_kwargs or {}))
        self.base = inner
        self.s_decay, self.betas, self.s_init, self.eps = s_decay, betas, s_init, eps
        self.store_delta, self.foreach = store_delta, foreach
        self._reducer = Reducer(name, process_group, comm)
        self._ready = False
        super().__init__([p for g in inner.param_groups for p in g["params"]], {})
        self.param_groups = inner.param_groups  # shared: schedulers and zero_grad see one list
        self._ready = True

    _extra_attrs = ("_reducer", "base", "s_decay", "betas", "s_init", "eps", "store_delta", "foreach", "_ready")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if getattr(self, "_ready", False):  # after construction the base optimizer owns the groups
            self.base.add_param_group(param_group)
        else:
            super().add_param_group(param_group)

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["base_state"] = self.base.state_dict()["state"]
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.base.load_state_dict({"state": state_dict["base_state"], "param_groups": state_dict["param_groups"]})
        mine = {"state": state_dict["state"], "param_groups": state_dict["param_groups"]}
        super().load_state_dict(mine)
        self.param_groups = self.base.param_groups
        _lowp.restore_fp32(self, mine, ("ref", "master", "delta"))

    def _tuner(self) -> dict[str, Any]:
        if "_tuner" not in self.state:
            n = len(self.betas)
            # s: scales, m: max |h| ("m"), v: sum of squared h ("v"), r: reward ("r")
            self.state["_tuner"] = dict(s=[0.0] * n, m=[1e-6] * n, v=[0.0] * n, r=[0.0] * n, iter_count=0)
            for g in self.param_groups:
                for p in g["params"]:
                    self.state[p]["ref"] = _lowp.float_state(p, p)
        return self.state["_tuner"]

    def step(self, closure: Optional[Callable[[], float]] = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        tuner = self._tuner()
        S = sum(tuner["s"])
        with torch.no_grad():
            work = []  # per (device, dtype): params, x (params or fp32 masters), refs, D (x - ref, or stored Delta)
            for g in self.param_groups:
                ps = [p for p in g["params"] if p.grad is not None]
                for p in ps:
                    if "ref" not in self.state[p]:  # added after the first step
                        self.state[p]["ref"] = _lowp.float_state(p, p)
                for _, idx in by_device_dtype(len(ps), lambda i: ps[i]).items():
                    sub = [ps[i] for i in idx]
                    xs = [_lowp.master(self.state[p], p) for p in sub]
                    refs = [self.state[p]["ref"] for p in sub]
                    if self.store_delta:
                        ds = [self.state[p].setdefault("delta", torch.zeros_like(x)) for p, x in zip(sub, xs)]
                        prev = [x.detach().clone() for x in xs]
                    else:
                        ds = torch._foreach_sub(xs, refs) if self.foreach else [x - r for x, r in zip(xs, refs)]
                        prev = None
                    work.append((sub, xs, refs, ds, prev))
            gd, gg = [], []
            for sub, _, _, ds, _ in work:  # gradient terms, read before the base step may change p.grad
                for _, (gv, dv) in buckets([[p.grad for p in sub], ds]):
                    gd.extend(dot(a, b) for a, b in zip(gv, dv))
                    gg.extend(sumsq(gv) if self.foreach else [dot(a, a) for a in gv])

        if closure is not None:
            base_out = self.base.step(_SkipOnce(loss, closure))
        else:
            base_out = self.base.step()

        with torch.no_grad():
            xx, xd = [], []
            for sub, xs, _, ds, _ in work:
                if _lowp.is_low(sub[0]):  # the base's move, measured on the rounded weights it stepped from
                    for p, x in zip(sub, xs):
                        x.add_(p.float() - x.to(p.dtype).float())
                for _, (pv, dv) in buckets([xs, ds]):
                    xd.extend(dot(a, b) for a, b in zip(pv, dv))
                    xx.extend(sumsq(pv) if self.foreach else [dot(a, a) for a in pv])
            device = work[0][0][0].device if work else torch.device("cpu")
            gD, gsq, xsq, xD = pull([add_total(x, device) for x in (gd, gg, xx, xd)], device, self._reducer)
            gn, xn = math.sqrt(gsq), math.sqrt(xsq)
            # h = <Delta, g + s_decay * S * |g| / |x| * x>, with Delta = (x - ref) / (S + eps) by default
            h = gD + self.s_decay * S * gn / (xn + self.eps) * xD
            if not self.store_delta:
                h /= S + self.eps
            S_new = max(self._tune(tuner, h), 0.0)
            for sub, xs, refs, ds, prev in work:
                if self.store_delta:
                    _apply_stored(xs, refs, ds, prev, S_new, self.foreach)
                else:
                    _apply_recomputed(xs, refs, ds, S_new, S_new / (S + self.eps), self.foreach)
                _lowp.write_back(sub, [self.state[p] for p in sub])
        return base_out if base_out is not None else loss

    def _tune(self, t: dict[str, Any], h: float) -> float:
        """One step of the tuner; returns the new total scale sum(s)."""
        n = len(self.betas)
        for i, b in enumerate(self.betas):
            t["m"][i] = max(b * t["m"][i], abs(h))
            t["v"][i] = b * b * t["v"][i] + h * h
            t["r"][i] = max(b * t["r"][i] - t["s"][i] * h, 0.0)
            wealth = t["m"][i] * self.s_init / n + t["r"][i]
            t["s"][i] = wealth / (math.sqrt(t["v"][i]) + self.eps)
        t["iter_count"] += 1
        return sum(t["s"])


class _SkipOnce:
    """Closure for the base step: returns the loss already computed, then re-evaluates."""

    def __init__(self, loss: Any, closure: Callable[[], Any]) -> None:
        self.loss, self.closure, self.calls = loss, closure, 0

    def __call__(self) -> Any:
        self.calls += 1
        return self.loss if self.calls == 1 else self.closure()


def _apply_recomputed(ps: list[Tensor], refs: list[Tensor], ds: list[Tensor], S: float, c: float,
                      foreach: bool) -> None:
    # x_new = ref + S * (D / (S_old + eps) + x_base - x_prev), with x_prev = ref + D:
    #       = S * x_base + (1 - S) * ref + (c - S) * D,   c = S / (S_old + eps)
    for _, (pv, rv, dv) in buckets([ps, refs, ds]):
        if foreach and _common.cpu_layout(pv[0]):
            for p, r in zip(pv, rv):  # p <- ref + S (p - ref), written straight into p
                torch.lerp(r, p, S, out=p)
            torch._foreach_add_(pv, dv, alpha=c - S)
        elif foreach:  # same arithmetic as on CPU: lerp from ref by the small weight S
            new = torch._foreach_lerp(rv, pv, S)
            torch._foreach_add_(new, dv, alpha=c - S)
            torch._foreach_copy_(pv, new)
        else:
            for p, r, d in zip(pv, rv, dv):
                torch.lerp(r, p, S, out=p).add_(d, alpha=c - S)


def _apply_stored(ps: list[Tensor], refs: list[Tensor], deltas: list[Tensor], prev: list[Tensor],
                  S: float, foreach: bool) -> None:
    # Delta += x_base - x_prev; x_new = ref + S * Delta
    if foreach:
        torch._foreach_add_(deltas, ps)
        torch._foreach_sub_(deltas, prev)
        torch._foreach_copy_(ps, refs)
        torch._foreach_add_(ps, deltas, alpha=S)
    else:
        for p, r, d, x in zip(ps, refs, deltas, prev):
            d.add_(p).sub_(x)
            p.copy_(r).add_(d, alpha=S)
