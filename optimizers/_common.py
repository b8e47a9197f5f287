"""Shared helpers: hyperparameter checks, cross-worker reduction, cache-sized buckets.

Private to the package; nothing here runs at import time.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, Union

import torch
from torch import Tensor

ParamsT = Union[Iterable[Tensor], Iterable[dict[str, Any]]]

# On CPU, foreach ops walk each op over every tensor, so a step streams the whole
# model through memory once per op. Cutting the work into buckets of about 1 MiB
# of float32 per operand keeps a bucket's operands in cache across the ops of
# one phase. Accelerators get a single bucket: their foreach kernels are fused.
CPU_BUCKET_ELEMS = 1 << 18

_LOW_PRECISION = (torch.float16, torch.bfloat16)

# torch's fused optimizer kernels (one vectorised pass per tensor for a whole
# Adam or SGD update) where they exist and keep our numerics: float16/bfloat16
# would compute in float32 inside the kernel, unlike the foreach path.
_FUSED_DEVICES = ("cpu", "cuda")
_FUSED_DTYPES = (torch.float32, torch.float64)

# A step count at which 1 - beta**step == 1 exactly for every beta < 1 (beta**step
# underflows to 0), so a fused Adam kernel applies no bias correction of its own.
_NO_BIAS_CORRECTION_STEP = 1e30


def local(t: Tensor) -> Tensor:
    """This process's shard of a DTensor (FSDP2's sharded parameters, their grads and the state made
    like them), sharing its storage; any other tensor as is. The step runs on shards, and the
    optimizer-wide sums (d, distances) are completed over the shards by the `Reducer`."""
    return t.to_local() if hasattr(t, "device_mesh") else t


def local_state(state: dict[str, Any]) -> dict[str, Any]:
    """A parameter's state with every DTensor as its shard (same storage, so in-place updates land)."""
    return {k: local(v) if isinstance(v, Tensor) else v for k, v in state.items()}


def sharded(t: Tensor) -> bool:
    return hasattr(t, "device_mesh")


def cpu_layout(t: Tensor) -> bool:
    """Whether to use the CPU strategy (cache-sized buckets, scratch temporaries) for ``t``'s device."""
    return t.device.type == "cpu"


def bad(owner: str, name: str, value: Any, fix: str) -> ValueError:
    """One-line error naming the bad hyperparameter and what to change."""
    return ValueError(f"{owner}: invalid {name}={value!r}; {fix}")


def check_range(owner: str, name: str, value: Any, lo: float, hi: float = math.inf, *,
                lo_open: bool = False, hi_open: bool = True) -> None:
    """Raise unless lo <= value <= hi (bounds open where asked)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)
    if ok:
        ok = (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
    if not ok:
        left = "(" if lo_open else "["
        right = ")" if hi_open else "]"
        raise bad(owner, name, value, f"use a number in {left}{lo}, {hi}{right}")


def check_betas(owner: str, betas: Any, n: int = 2, name: str = "betas") -> tuple[float, ...]:
    """Raise unless betas is a sequence of n numbers in [0, 1)."""
    try:
        vals = tuple(float(b) for b in betas)
    except TypeError:
        raise bad(owner, name, betas, f"pass a tuple of {n} numbers in [0, 1)") from None
    if len(vals) != n or not all(0.0 <= b < 1.0 for b in vals):
        raise bad(owner, name, betas, f"pass a tuple of {n} numbers in [0, 1)")
    return vals


def check_same_across_groups(owner: str, groups: list[dict[str, Any]], keys: Sequence[str]) -> None:
    """Settings that drive one optimizer-wide scalar cannot differ between groups."""
    for key in keys:
        first = groups[0][key]
        for g in groups[1:]:
            if g[key] != first:
                raise bad(owner, key, g[key],
                          f"it drives the optimizer-wide step size, so every param group must "
                          f"use the same value as the first group ({first!r})")


def check_fused(owner: str, fused: Any, foreach: Any) -> None:
    """Validate ``fused`` as torch.optim does: None (where supported), True or False."""
    if fused is not None and not isinstance(fused, bool):
        raise bad(owner, "fused", fused, "pass None (use fused kernels where supported), True or False")
    if fused and not foreach:
        raise bad(owner, "fused", fused, "fused kernels replace the foreach path; "
                  "use foreach=True, or fused=None/False with foreach=False")


def use_fused(owner: str, fused: Optional[bool], t: Tensor) -> bool:
    """Whether the fused kernels run for ``t``'s device and dtype (``fused=True`` insists)."""
    ok = t.device.type in _FUSED_DEVICES and t.dtype in _FUSED_DTYPES
    if fused and not ok:
        raise bad(owner, "fused", fused, f"fused kernels support float32/float64 on "
                  f"{'/'.join(_FUSED_DEVICES)}, not {t.dtype} on {t.device.type}; use fused=None")
    return ok if fused is None else fused


def dense(*lists: Sequence[Tensor]) -> bool:
    """Whether every tensor is contiguous: the fused kernels walk raw memory and ignore strides."""
    return all(t.is_contiguous() for ts in lists for t in ts)


class KeepsExtras:
    """Mixin: torch's Optimizer pickles and deep-copies only defaults, state and
    param_groups; keep the attributes named in ``_extra_attrs`` as well."""

    _extra_attrs: tuple[str, ...] = ("_reducer", "_scratch")

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()  # type: ignore[misc]
        state.update({k: self.__dict__[k] for k in self._extra_attrs if k in self.__dict__})
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)  # type: ignore[misc]
        self.__dict__.setdefault("_scratch", Scratch())
        self.__dict__.setdefault("_reducer", Reducer(type(self).__name__))


class Reducer:
    """Sums small tensors over workers that hold different shards of the parameters.

    Either a torch.distributed ProcessGroup or a duck-typed comm object with
    ``all_reduce(list_of_tensors, op="sum")`` that reduces in place. Without
    either it does nothing (one worker, or replicated parameters as in DDP).
    """

    def __init__(self, owner: str, process_group: Any = None, comm: Any = None) -> None:
        if process_group is not None and comm is not None:
            raise bad(owner, "comm", comm, "pass either process_group or comm, not both")
        if comm is not None and not callable(getattr(comm, "all_reduce", None)):
            raise bad(owner, "comm", comm, "pass an object with all_reduce(list_of_tensors, op='sum')")
        self.process_group = process_group
        self.comm = comm

    @property
    def active(self) -> bool:
        return self.process_group is not None or self.comm is not None

    def __deepcopy__(self, memo: dict) -> "Reducer":
        return self  # a copy of the optimizer talks to the same workers

    def __reduce__(self) -> tuple[Any, ...]:
        if self.active:
            raise TypeError("cannot pickle an optimizer bound to a process_group/comm; "
                            "save optimizer.state_dict() instead")
        return (Reducer, ("",))

    def sum_(self, t: Tensor) -> Tensor:
        """Reduce ``t`` in place. Every worker must call this every step (never skipped)."""
        if self.comm is not None:
            self.comm.all_reduce([t], op="sum")
        elif self.process_group is not None:
            import torch.distributed as dist  # only when asked for: keeps import light

            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.process_group)
        return t


def acc_dtype(device: torch.device) -> torch.dtype:
    """Dtype for the few global scalars: float64 where the device has it."""
    return torch.float32 if device.type == "mps" else torch.float64


def pull(values: Sequence[Tensor], device: torch.device, reducer: Optional[Reducer]) -> list[float]:
    """Stack partial sums, reduce over workers, bring them to the host in one sync."""
    dt = acc_dtype(device)
    if values:
        t = torch.stack([v.to(dt) for v in values])
    else:
        t = torch.zeros(0, dtype=dt, device=device)
    if reducer is not None and reducer.active:
        reducer.sum_(t)
    return t.tolist()


def pull_scattered(parts: Sequence[Tensor], slots: Sequence[int], size: int, device: torch.device,
                   reducer: Optional[Reducer]) -> list[float]:
    """Like :func:`pull`, for partial sums that add into ``size`` totals: the entries of the parts, in
    order (a part is a 0-dim tensor or a 1-D tensor of several), add to the slots ``slots`` in order."""
    dt = acc_dtype(device)
    t = torch.zeros(size, dtype=dt, device=device)
    if parts:
        if all(x.dtype == parts[0].dtype and x.device == device for x in parts):
            vals = torch.cat([x.reshape(-1) for x in parts]).to(dt)  # one conversion, not one per part
        else:
            vals = torch.cat([x.reshape(-1).to(device=device, dtype=dt) for x in parts])
        t.index_add_(0, torch.tensor(list(slots), device=device), vals)
    if reducer is not None and reducer.active:
        reducer.sum_(t)
    return t.tolist()


def by_device_dtype(n: int, key: Callable[[int], Tensor]) -> dict[tuple[torch.device, torch.dtype], list[int]]:
    """Indices grouped by (device, dtype) of ``key(i)``: foreach ops need uniform lists."""
    out: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i in range(n):
        t = key(i)
        out.setdefault((t.device, t.dtype), []).append(i)
    return out


def buckets(lists: Sequence[Sequence[Tensor]], *, limit: Optional[int] = None
            ) -> Iterator[tuple[list[int], list[list[Tensor]]]]:
    """Yield (owner indices, per-list views) covering ``lists`` in cache-sized pieces.

    All lists are parallel (same length). A tensor larger than the limit is cut
    into 1-D slices when every operand is contiguous with the same numel.
    """
    if not lists or not lists[0]:
        return
    if limit is None:
        limit = CPU_BUCKET_ELEMS if cpu_layout(lists[0][0]) else 0
    if limit <= 0:
        yield list(range(len(lists[0]))), [list(x) for x in lists]
        return
    # plan first (entries: index, or (index, start, length) for a slice), then build views per list
    plan: list[list[Any]] = []
    cur: list[Any] = []
    n = 0
    for i, t in enumerate(lists[0]):
        numel = t.numel()
        if numel > limit and all(x[i].numel() == numel and x[i].is_contiguous() for x in lists):
            for start in range(0, numel, limit):
                length = min(limit, numel - start)
                cur.append((i, start, length))
                n += length
                if n >= limit:
                    plan.append(cur)
                    cur, n = [], 0
            continue
        cur.append(i)
        n += numel
        if n >= limit:
            plan.append(cur)
            cur, n = [], 0
    if cur:
        plan.append(cur)
    for entries in plan:
        if all(type(e) is int for e in entries):
            yield entries, [[x[i] for i in entries] for x in lists]
        else:
            idx = [e if type(e) is int else e[0] for e in entries]
            yield idx, [[x[e] if type(e) is int else x[e[0]].view(-1).narrow(0, e[1], e[2]) for e in entries]
                        for x in lists]


class Scratch:
    """Reusable temporaries for CPU buckets.

    A fresh CPU allocation of a bucket-sized temporary costs more than the
    arithmetic on it (the memory is faulted in anew every step), so CPU
    temporaries are views into a few flat buffers kept by the optimizer.
    Elsewhere (caching allocators) they are plain allocations.
    """

    def __init__(self) -> None:
        self._bufs: dict[tuple[torch.dtype, int], Tensor] = {}
        # building views costs more Python time than the arithmetic on small tensors: reuse them
        self._views: dict[tuple[Any, ...], tuple[list[Tensor], Tensor]] = {}
        self._steps: dict[torch.device, Tensor] = {}

    def no_bias_correction_steps(self, device: torch.device, n: int) -> list[Tensor]:
        """``state_steps`` for a fused Adam kernel that must not bias-correct (it only reads them)."""
        t = self._steps.get(device)
        if t is None:
            t = self._steps[device] = torch.full((), _NO_BIAS_CORRECTION_STEP, dtype=torch.float32, device=device)
        return [t] * n

    def like(self, ts: Sequence[Tensor], slot: int) -> tuple[list[Tensor], Optional[Tensor]]:
        """Uninitialised tensors shaped like ``ts``, and the flat tensor they tile (None if not one).

        ``slot`` tells apart temporaries that are alive at the same time.
        """
        if not ts:
            return [], None
        t0 = ts[0]
        if not cpu_layout(t0):
            return [torch.empty_like(t) for t in ts], None
        key = (t0.dtype, slot, *[t.shape for t in ts])
        hit = self._views.get(key)
        if hit is not None:
            return hit
        total = sum(t.numel() for t in ts)
        if total > 4 * CPU_BUCKET_ELEMS:
            return [torch.empty_like(t) for t in ts], None
        buf = self._bufs.get((t0.dtype, slot))
        if buf is None or buf.numel() < total:
            buf = self._bufs[(t0.dtype, slot)] = torch.empty(max(total, 2 * CPU_BUCKET_ELEMS), dtype=t0.dtype)
            self._views = {k: v for k, v in self._views.items() if k[:2] != (t0.dtype, slot)}
        out, off = [], 0
        for t in ts:
            n = t.numel()
            out.append(buf[off:off + n].view(t.shape))
            off += n
        if len(self._views) > 4096:  # shapes keep changing (e.g. params added): start over
            self._views.clear()
        self._views[key] = (out, buf[:total])
        return out, buf[:total]

    def __reduce__(self) -> tuple[Any, ...]:
        return (Scratch, ())  # temporaries carry nothing worth copying or pickling


def fresh(scratch: Scratch, slot: int, foreach_fn: Callable[..., Any], plain_fn: Callable[..., Any],
          *lists: Sequence[Tensor], **kw: Any) -> tuple[list[Tensor], Optional[Tensor]]:
    """Out-of-place ``foreach_fn(*lists, **kw)``, and the flat tensor the results tile (or None).

    On CPU the results go into scratch through ``plain_fn(..., out=...)`` one
    tensor at a time: one pass, no allocation. Elsewhere the foreach op runs.
    """
    first = lists[0]
    if not first:
        return [], None
    if cpu_layout(first[0]):
        outs, flat = scratch.like(first, slot)
        for o, *xs in zip(outs, *lists):
            plain_fn(*xs, out=o, **kw)
        return outs, flat
    return list(foreach_fn(*[list(x) for x in lists], **kw)), None


def total_of(views: list[Tensor], flat: Optional[Tensor]) -> list[Tensor]:
    """Sum of all entries, as one 0-dim tensor per call where the views tile one flat buffer."""
    if flat is not None:
        return [flat.sum(dtype=torch.float32) if flat.dtype in _LOW_PRECISION else flat.sum()]
    return [v.sum(dtype=torch.float32) if v.dtype in _LOW_PRECISION else v.sum() for v in views]


def scale_add_(xs: list[Tensor], ys: list[Tensor], a: float, b: float, *, fused: bool) -> None:
    """xs = a * xs + b * ys.

    With ``fused``, one pass instead of two: torch's fused SGD kernel computes
    x - lr * (y + wd * x), which is this with lr = -b, wd = (a - 1) / b; its
    rounding error, eps * (|b y| + |(a - 1) x|), is that of the two-op form.
    The bound on wd only keeps wd * x finite.
    """
    if fused and b != 0.0 and abs(a - 1.0) <= 1e12 * abs(b) and dense(xs, ys):
        torch._fused_sgd_(xs, ys, [], weight_decay=(a - 1.0) / b, momentum=0.0, lr=-b, dampening=0.0,
                          nesterov=False, maximize=False, is_first_step=False)
        return
    torch._foreach_mul_(xs, a)
    torch._foreach_add_(xs, ys, alpha=b)


def l1_total(scratch: Scratch, xs: list[Tensor], slot: int) -> list[Tensor]:
    """Partial sums of |x| over a bucket (torch's ord=1 foreach norm is slow on CPU)."""
    tmp, flat = fresh(scratch, slot, torch._foreach_abs, torch.abs, xs)
    return total_of(tmp, flat)


def dot(a: Tensor, b: Tensor) -> Tensor:
    """Inner product of two same-shape tensors, accumulated in at least float32."""
    if a.dtype in _LOW_PRECISION:
        a, b = a.float(), b.float()
    if a.is_contiguous() and b.is_contiguous():
        return torch.dot(a.reshape(-1), b.reshape(-1))
    return (a * b).sum()


def sumsq(xs: list[Tensor]) -> list[Tensor]:
    """Per-tensor sum of squares (foreach where torch has it)."""
    if not xs:
        return []
    if hasattr(torch, "_foreach_powsum"):
        dt = torch.float32 if xs[0].dtype in _LOW_PRECISION else None
        return list(torch._foreach_powsum(xs, 2, dtype=dt))
    return [n * n for n in torch._foreach_norm(xs)]


def sum_abs(xs: list[Tensor]) -> list[Tensor]:
    """Per-tensor L1 norm. torch's ord=1 foreach norm is slow on CPU, so abs then sum."""
    out = []
    for x in xs:
        a = x.abs()
        out.append(a.sum(dtype=torch.float32) if x.dtype in _LOW_PRECISION else a.sum())
    return out


def add_total(parts: list[Tensor], device: torch.device) -> Tensor:
    """Sum of a list of 0-dim tensors (zero when empty), in the accumulation dtype."""
    dt = acc_dtype(device)
    if not parts:
        return torch.zeros((), dtype=dt, device=device)
    return torch.stack(parts).to(dt).sum()
