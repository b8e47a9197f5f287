"""What every algorithm shares: the contract, hooks on the user's optimizer, and `attach`.

The contract (see README "Adding an algorithm"):

- an algorithm is a hook on the user's optimizer, built ``Algo(optimizer, comm, cfg=None,
  **overrides)``; SPSA may be the optimizer itself and then honours the Optimizer contract;
- its dataclass ``Config`` (``name`` first) is the only place its defaults live, and
  ``Config.validate()`` the only place they are checked (one-line ValueError naming the key);
  `make_config` merges ``cfg`` and ``overrides`` and validates once, for the library and for
  ``dtrain train`` alike;
- ``state_dict``/``load_state_dict`` (exact resume), ``report()`` (into summary.json),
  ``remove()`` and ``skipped_steps`` (updates skipped on every worker together);
- its module defines ``Config`` and, if the default is not enough, ``attach(cfg, ctx)``; a module
  may declare ``REPLACES = {"optim": ("schedule", ...)}``: keys of other sections it makes
  meaningless, which `dtrain.config` refuses when a user sets them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import torch

from dtrain.comm.base import Comm
from dtrain.comm.flat import local, locals_  # noqa: F401 - re-exported for the algorithms


def optimizer_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The parameters an algorithm acts on, found through the optimizer's own param_groups."""
    seen: set[int] = set()
    out = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


def all_finite(comm: Comm, tensors: list[torch.Tensor]) -> bool:
    """Whether ``tensors`` are finite on this worker. A worker of several processes (``comm.inner_comm``,
    FSDP2 shards) agrees by one tiny inner reduction, so its processes skip or apply an update together."""
    checks = [torch.isfinite(local(t)).all() for t in tensors if t.is_floating_point()]
    ok = bool(torch.stack(checks).all()) if checks else True  # one host sync for the whole list
    inner = comm.inner_comm
    if inner is None or inner.world_size == 1:
        return ok
    flag = torch.tensor([1.0 if ok else 0.0])
    inner.all_reduce([flag], op="min")
    return bool(flag.item() > 0)


C = TypeVar("C")


def make_config(config_cls: type[C], cfg: Any = None, overrides: dict[str, Any] | None = None, *, owner: str = "") -> C:
    """``cfg`` (a ``config_cls``, a mapping such as dtrain's section config, or None for the
    defaults) with ``overrides`` applied, validated once. An unknown override is a TypeError."""
    names = [f.name for f in dataclasses.fields(config_cls) if f.name != "name"]
    owner = owner or config_cls.__module__.rsplit(".", 1)[-1]
    unknown = sorted(set(overrides or {}) - set(names))
    if unknown:
        raise TypeError(f"{owner}: unknown option {unknown[0]!r}; choose from {', '.join(names)}")
    if cfg is None:
        made = config_cls()
    elif isinstance(cfg, config_cls):
        made = cfg
    else:  # a mapping with the same keys (dtrain.config's validated section)
        made = config_cls(**{n: _plain(cfg[n]) for n in names if n in cfg})
    made = dataclasses.replace(made, **(overrides or {}))
    check = getattr(made, "validate", None)
    if check is not None:
        check()
    return made


def check_outer_step(cfg: Any) -> None:
    """The keys of an outer step every H inner steps (DiLoCo, NoLoCo): one-line errors naming them."""
    if cfg.sync_every < 1:
        raise ValueError(f"algo.sync_every must be >= 1, got {cfg.sync_every}")
    if cfg.outer_lr <= 0:
        raise ValueError(f"algo.outer_lr must be > 0, got {cfg.outer_lr}")
    if not 0 <= cfg.outer_momentum < 1:
        raise ValueError(f"algo.outer_momentum must be in [0, 1), got {cfg.outer_momentum}")


def _plain(value: Any) -> Any:
    """A config container as the plain list/dict a dataclass field holds."""
    if isinstance(value, (str, bytes, int, float, bool)) or value is None:
        return value
    if hasattr(value, "items"):
        return {k: _plain(v) for k, v in value.items()}
    if hasattr(value, "__iter__"):
        return [_plain(v) for v in value]
    return value


class OptimizerHook:
    """Base for algorithms that ride on a user's optimizer via its step pre/post hooks.

    Subclasses override `before_step` (runs inside ``optimizer.step()`` before the update; may
    set grads to None to skip the update, which torch optimizers honour) and/or `after_step`.
    ``step`` counts every ``optimizer.step()`` call, including skipped ones, so workers that skip
    a step on a NaN loss stay in lock-step with the others.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, comm: Comm) -> None:
        self.optimizer = optimizer
        self.comm = comm
        self.step = 0
        self.skipped_steps = 0
        self.peak_step_bytes = 0  # most bytes this worker sent within one optimizer step (its hooks included)
        self.step_bytes = 0  # bytes sent within optimizer steps: the algorithm's traffic, setup and loop excluded
        self._bytes_mark = self._sent_so_far()
        self._hooks = [
            optimizer.register_step_pre_hook(lambda *_: self._before()),
            optimizer.register_step_post_hook(lambda *_: self._after()),
        ]

    @property
    def params(self) -> list[torch.Tensor]:
        return optimizer_params(self.optimizer)

    def before_step(self) -> None:
        pass

    def after_step(self) -> None:
        pass

    def _before(self) -> None:
        self._bytes_mark = self._sent_so_far()
        self.before_step()

    def _after(self) -> None:
        self.step += 1
        self.after_step()
        sent = self._sent_so_far()
        self.peak_step_bytes = max(self.peak_step_bytes, sent - self._bytes_mark)
        self.step_bytes += sent - self._bytes_mark

    def _sent_so_far(self) -> int:
        stats = getattr(self.comm, "stats", None)  # LISA may run without a comm
        return 0 if stats is None else int(stats.bytes_sent)

    def skip_update(self) -> None:
        """Make the pending ``optimizer.step()`` a no-op on parameters (grads set to None)."""
        for p in self.params:
            p.grad = None
        self.skipped_steps += 1

    def release(self, params: list[torch.Tensor]) -> None:
        """``params`` are frozen from now on (LISA): drop any per-parameter state kept for them.

        A no-op here; algorithms with outer state (DiLoCo, NoLoCo) free it, at the latest after their
        next outer step. ``params`` do not change until `restore` is called with them."""

    def restore(self, params: list[torch.Tensor]) -> None:
        """``params`` train again (LISA): rebuild the state `release` dropped from their current values."""

    def remove(self) -> None:
        """Detach from the optimizer; the optimizer behaves as if never hooked."""
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.skipped_steps = int(state["skipped_steps"])

    def report(self) -> dict[str, Any]:
        return {"skipped_steps": self.skipped_steps, "peak_step_bytes": self.peak_step_bytes, "step_bytes": self.step_bytes}


class Algorithm(OptimizerHook):
    """Base of the algorithms that hook a user's optimizer: ``Algo(optimizer, comm, cfg=None, **overrides)``.

    ``Config`` is the subclass's dataclass; ``self.cfg`` is the merged, validated instance.
    """

    Config: ClassVar[type]

    def __init__(self, optimizer: torch.optim.Optimizer, comm: Comm, cfg: Any = None, **overrides: Any) -> None:
        self.cfg = make_config(type(self).Config, cfg, overrides, owner=type(self).__name__)
        super().__init__(optimizer, comm)

    @classmethod
    def attach(cls, cfg: Any, ctx: AttachContext) -> Attached:
        """What `dtrain train` hooks: the default builds ``cls(ctx.optimizer, ctx.comm, cfg)``."""
        return Attached(algorithm=cls(ctx.optimizer, ctx.comm, cfg))


@dataclass
class Attached:
    """What an algorithm module's ``attach(...)`` hands the training loop.

    algorithm: has state_dict()/load_state_dict() (checkpointed) and optionally remove()/report().
    scheduler: replaces the loop's default LR schedule (HDET); None keeps the default.
    scheduler_takes_loss: call ``scheduler.step(loss)`` instead of ``scheduler.step()``.
    forward_only: the algorithm is the optimizer: the loop calls ``algorithm.step(closure)``
        with a closure returning the loss (no backward), instead of backward + optimizer.step().
    """

    algorithm: Any
    scheduler: Any = None
    scheduler_takes_loss: bool = False
    forward_only: bool = False


@dataclass
class AttachContext:
    """Everything the training loop knows that an algorithm may need when it attaches.

    ``lr`` is the optimizer's peak learning rate from the config; ``total_steps`` the run length.
    """

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    comm: Comm
    seed: int
    total_steps: int
    lr: float
    workload: Any = None
