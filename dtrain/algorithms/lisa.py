"""LISA (Pan et al. 2024, arXiv 2403.17919): layerwise importance sampling that really frees memory.

Everything outside the block list (embeddings, final norm, head) trains all the time. Every
``interval`` optimizer steps, ``gamma`` of the L blocks are drawn (uniformly, or with given
probabilities) and unfrozen; the other blocks are frozen. Unlike LMFlow's callback, a frozen
block holds no ``.grad`` and no optimizer state: its state is dropped when it is frozen and the
optimizer re-initialises it lazily when the block comes back (torch optimizers create state on a
param's first step with a grad, and skip params whose grad is None). With ``offload_state=True``
the state is moved to CPU instead and restored on unfreeze.

Usage in your own loop (the optimizer must hold *all* parameters, frozen or not)::

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    lisa = LISA(optimizer, comm, model=model, blocks="transformer.h", gamma=2, interval=20)
    diloco = DiLoCo(optimizer, comm, sync_every=100)  # optional: any other algorithm, built after LISA
    lisa.notify(diloco)                 # frozen blocks' outer state (φ, outer momentum) is freed too
    for batch in data:                  # unchanged loop: LISA rides on optimizer.step()
        loss(model, batch).backward()
        optimizer.step()                # post-hook: count the step, switch blocks every interval
        optimizer.zero_grad()

With ``hook_optimizer=False`` nothing is hooked; call ``lisa.step_done()`` after each
``optimizer.step()`` instead (``lisa.step`` is the step count). Blocks switch in the step
*post*-hook, so the gradients that an all-reduce (dtrain's DDP hook, registered after LISA) sees
are always those of the blocks the backward pass used. All replicas draw the same blocks: the
draw for switch k uses its own ``torch.Generator`` seeded from (seed, k), never the global RNG,
so pass the same seed on every rank. Resuming (``state_dict``/``load_state_dict``) continues the
same sequence.

Composition (`notify`): on every switch LISA calls ``outer.release(frozen)`` and
``outer.restore(unfrozen)`` on each algorithm it was told about (`OptimizerHook` defines both as
no-ops); DiLoCo and NoLoCo drop their outer state for released parameters. ``seed`` and
``model`` are facts of the run (``dtrain train`` passes its run seed), not options of `Config`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dtrain.algorithms.base import Algorithm, AttachContext, Attached, OptimizerHook
from dtrain.comm.base import Comm
from dtrain.seeding import digest_seed


@dataclass
class Config:
    name: str = "lisa"
    blocks: str = "blocks"  # attribute path of the nn.ModuleList of middle blocks; a model without `blocks`: see KNOWN_BLOCKS
    gamma: int = 2  # blocks unfrozen at a time (LMFlow default)
    interval: int = 20  # optimizer steps between draws (LMFlow default)
    probabilities: list[float] | None = None  # None = uniform; else one per block, summing to 1
    offload_state: bool = False  # keep a frozen block's optimizer state on CPU and restore it on unfreeze

    def validate(self) -> None:
        """One-line ValueError naming the lisa.* key (the model-dependent checks run at construction)."""
        if self.gamma < 1:
            raise ValueError(f"lisa.gamma must be >= 1, got {self.gamma}")
        if self.interval < 1:
            raise ValueError(f"lisa.interval must be >= 1, got {self.interval}")
        if self.probabilities is None:
            return
        probs = [float(p) for p in self.probabilities]
        if any(not math.isfinite(p) or p < 0 for p in probs):
            raise ValueError(f"lisa.probabilities must be finite and >= 0, got {probs}")
        if abs(sum(probs) - 1.0) > 1e-6:
            raise ValueError(f"lisa.probabilities must sum to 1, got {sum(probs):.6g}")
        if sum(p > 0 for p in probs) < self.gamma:
            raise ValueError(f"lisa.probabilities has fewer than lisa.gamma={self.gamma} non-zero entries; raise them or lower lisa.gamma")


validate = Config.validate  # dtrain.config calls it on the lisa section


# Where Hugging Face-style causal LMs keep their blocks (GPT-2, Llama/Mistral/Qwen, GPT-NeoX, OPT, MPT).
KNOWN_BLOCKS = ("transformer.h", "model.layers", "gpt_neox.layers", "model.decoder.layers", "transformer.blocks")


def find_blocks(model: nn.Module) -> str | None:
    """The first of `KNOWN_BLOCKS` that is an ``nn.ModuleList`` of ``model``, or None."""
    for path in KNOWN_BLOCKS:
        obj: Any = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
        if isinstance(obj, nn.ModuleList):
            return path
    return None


def resolve_blocks(model: nn.Module, path: str) -> nn.ModuleList:
    """The ``nn.ModuleList`` at attribute path ``path`` (e.g. ``transformer.h``) of ``model``. With the
    default path (``blocks``) on a model that has none, a Hugging Face-style block list is found by itself."""
    if path == Config.blocks and not hasattr(model, path) and (found := find_blocks(model)) is not None:
        path = found
    obj: Any = model
    for i, part in enumerate(path.split(".")):
        if not hasattr(obj, part):
            where = ".".join(path.split(".")[:i]) or type(model).__name__
            raise ValueError(
                f"lisa.blocks={path!r} not found: {where} has no attribute {part!r}; set lisa.blocks to the "
                "attribute path of the model's block list (e.g. blocks, transformer.h, model.layers)"
            )
        obj = getattr(obj, part)
    if not isinstance(obj, nn.ModuleList):
        raise ValueError(f"lisa.blocks={path!r} is a {type(obj).__name__}, not an nn.ModuleList; point it at the list of blocks")
    return obj


def check_blocks(n_blocks: int, cfg: Config) -> None:
    """Raise ValueError (one line, naming the lisa.* key) where ``cfg`` does not fit the model's blocks."""
    if n_blocks < 1:
        raise ValueError(f"lisa.blocks={cfg.blocks!r} is an empty ModuleList; point it at the model's blocks")
    if cfg.gamma > n_blocks:
        raise ValueError(f"lisa.gamma must be in [1, {n_blocks}] (the blocks in lisa.blocks={cfg.blocks!r}), got {cfg.gamma}")
    if cfg.probabilities is not None and len(cfg.probabilities) != n_blocks:
        raise ValueError(f"lisa.probabilities has {len(cfg.probabilities)} entries but lisa.blocks={cfg.blocks!r} has {n_blocks} blocks")


def switch_seed(seed: int, switch: int) -> int:
    """A stable 63-bit seed for draw ``switch`` of run ``seed`` (same on every machine and Python)."""
    return digest_seed(f"dtrain.lisa/{int(seed)}/{int(switch)}".encode())


def sample_blocks(n_blocks: int, gamma: int, *, seed: int, switch: int, probabilities: Sequence[float] | None = None) -> list[int]:
    """The sorted indices of the ``gamma`` blocks active during switch window ``switch``."""
    gen = torch.Generator().manual_seed(switch_seed(seed, switch))
    if probabilities is None:
        chosen = torch.randperm(n_blocks, generator=gen)[:gamma]
    else:
        weights = torch.tensor([float(p) for p in probabilities], dtype=torch.float64)
        chosen = torch.multinomial(weights, gamma, replacement=False, generator=gen)
    return sorted(int(i) for i in chosen)



class LISA(Algorithm):
    """``LISA(optimizer, comm, cfg=None, *, model, seed=0, **overrides)``: freezes all but ``gamma``
    sampled blocks of ``model``, switching every ``interval`` optimizer steps.

    ``step`` counts ``optimizer.step()`` calls (skipped ones too, so replicas stay in lock-step);
    ``history`` lists ``[step, blocks]`` for every switch, the first at construction. ``comm`` is
    unused (the draw needs no communication) and may be None.
    """

    Config = Config

    def __init__(self, optimizer: torch.optim.Optimizer, comm: Comm | None, cfg: Config | None = None, *,
                 model: nn.Module, seed: int = 0, hook_optimizer: bool = True, **overrides: Any) -> None:
        super().__init__(optimizer, comm, cfg, **overrides)  # type: ignore[arg-type]
        if not hook_optimizer:  # wiring, not an option: the caller counts steps with step_done()
            for h in self._hooks:
                h.remove()
            self._hooks = []
        self.block_list = resolve_blocks(model, self.cfg.blocks)
        check_blocks(len(self.block_list), self.cfg)
        self.model, self.seed = model, int(seed)
        self.probabilities = None if self.cfg.probabilities is None else [float(p) for p in self.cfg.probabilities]
        self.history: list[list[Any]] = []
        self.active: list[int] = []
        self.outers: list[OptimizerHook] = []
        # Only params the user left trainable take part; a param shared with the outside stays on.
        outside = {id(p) for p in model.parameters()} - {id(p) for b in self.block_list for p in b.parameters()}
        self._block_params = [
            [p for p in block.parameters() if p.requires_grad and id(p) not in outside] for block in self.block_list
        ]
        self._index = {id(p): i for i, p in enumerate(self.params)}
        missing = [i for i, ps in enumerate(self._block_params) if any(id(p) not in self._index for p in ps)]
        if missing:
            raise ValueError(
                f"parameters of lisa.blocks={self.cfg.blocks!r} blocks {missing} are not in the optimizer; build the optimizer "
                "over all of model.parameters() (a block frozen before the optimizer is built would never train)"
            )
        # Offloaded optimizer state of frozen params, by index in optimizer_params(optimizer).
        self._offloaded: dict[int, dict[str, Any]] = {}
        self._devices: dict[int, dict[str, str]] = {}
        self._switch(0)

    @property
    def gamma(self) -> int:
        return self.cfg.gamma

    @property
    def interval(self) -> int:
        return self.cfg.interval

    @classmethod
    def attach(cls, cfg: Any, ctx: AttachContext) -> Attached:
        """What `dtrain train` hooks (first, before the algorithm it composes with): the run's seed is used."""
        return Attached(algorithm=cls(ctx.optimizer, ctx.comm, cfg, model=ctx.model, seed=ctx.seed))

    def notify(self, outer: OptimizerHook) -> None:
        """Tell ``outer`` of every freeze and unfreeze from now on; the blocks frozen now are released at once."""
        self.outers.append(outer)
        frozen = self.frozen_params()
        if frozen:
            outer.release(frozen)

    # -- switching --------------------------------------------------------------------------

    def _switch(self, switch: int) -> None:
        chosen = sample_blocks(len(self.block_list), self.gamma, seed=self.seed, switch=switch, probabilities=self.probabilities)
        self.history.append([self.step, chosen])
        self._apply(chosen)

    def _apply(self, active: list[int], *, notify: bool = True) -> None:
        """Unfreeze exactly the blocks in ``active``; drop (or offload) grads and state of the rest."""
        self.active = list(active)
        on = {id(p) for i in active for p in self._block_params[i]}
        frozen, unfrozen = [], []
        with torch.no_grad():
            for params in self._block_params:
                for p in params:
                    if id(p) in on:
                        if not p.requires_grad:
                            p.requires_grad_(True)
                            self._restore(p)
                            unfrozen.append(p)
                    elif p.requires_grad:
                        p.requires_grad_(False)
                        p.grad = None
                        self._evict(p)
                        frozen.append(p)
        for outer in self.outers if notify else ():
            if unfrozen:
                outer.restore(unfrozen)
            if frozen:
                outer.release(frozen)

    def _evict(self, p: torch.Tensor) -> None:
        state = self.optimizer.state.pop(p, None)
        if not state or not self.cfg.offload_state:
            return
        i = self._index[id(p)]
        self._devices[i] = {k: str(v.device) for k, v in state.items() if isinstance(v, torch.Tensor)}
        self._offloaded[i] = {k: v.detach().to("cpu", copy=True) if isinstance(v, torch.Tensor) else v for k, v in state.items()}

    def _restore(self, p: torch.Tensor) -> None:
        i = self._index[id(p)]
        saved = self._offloaded.pop(i, None)
        devices = self._devices.pop(i, {})
        if saved is not None:
            # State that lived beside the parameter goes back beside it (wherever the parameter is now: a
            # checkpoint may move a run between devices); state kept on the CPU (Adam's step) stays there.
            self.optimizer.state[p] = {
                k: v.to("cpu" if devices.get(k) == "cpu" else p.device) if isinstance(v, torch.Tensor) else v
                for k, v in saved.items()
            }

    def step_done(self) -> None:
        """Count one optimizer step and switch when due (the post-hook calls this; call it yourself
        after each ``optimizer.step()`` when built with ``hook_optimizer=False``)."""
        self._after()

    def after_step(self) -> None:
        # An optimizer that creates state eagerly (even without a grad) gets it taken away again.
        for p in self.frozen_params():
            self.optimizer.state.pop(p, None)
        if self.step % self.interval == 0:
            self._switch(self.step // self.interval)

    # -- introspection ----------------------------------------------------------------------

    def frozen_params(self) -> list[torch.Tensor]:
        active = set(self.active)
        return [p for i, ps in enumerate(self._block_params) if i not in active for p in ps]

    def trainable_params(self) -> list[torch.Tensor]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def report(self) -> dict[str, Any]:
        trainable = sum(p.numel() for p in self.trainable_params())
        total = sum(p.numel() for p in self.model.parameters())
        return {
            "lisa_step": self.step, "active_blocks": list(self.active), "switches": len(self.history),
            "history": [[s, list(b)] for s, b in self.history], "trainable_params": trainable, "total_params": total,
        }

    # -- checkpointing ----------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Step, active blocks, switch history and any offloaded state (CPU tensors; weights_only-safe)."""
        return {
            **super().state_dict(), "seed": self.seed, "gamma": self.gamma, "interval": self.interval,
            "active": list(self.active), "history": [[s, list(b)] for s, b in self.history],
            "offloaded": {i: dict(s) for i, s in self._offloaded.items()},
            "devices": {i: dict(d) for i, d in self._devices.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue a saved run: call after ``optimizer.load_state_dict`` (the active blocks' state lives
        there). Composed algorithms restore their own outer state from their own state_dict."""
        for key in ("seed", "gamma", "interval"):
            if int(state[key]) != getattr(self, key):
                raise ValueError(f"lisa.{key}={getattr(self, key)} differs from the checkpoint's {state[key]}; resume with the same lisa settings")
        super().load_state_dict(state)
        self.history = [[int(s), [int(b) for b in blocks]] for s, blocks in state["history"]]
        self._offloaded = {int(i): dict(s) for i, s in state["offloaded"].items()}
        self._devices = {int(i): dict(d) for i, d in state["devices"].items()}
        for params in self._block_params:  # make _apply treat every block as newly switched
            for p in params:
                p.requires_grad_(False)
        active = [int(b) for b in state["active"]]
        on = {id(p) for i in active for p in self._block_params[i]}
        for params in self._block_params:
            for p in params:
                if id(p) not in on:
                    p.grad = None
                    self.optimizer.state.pop(p, None)
        self._apply(active, notify=False)

    def remove(self) -> None:
        """Unhook and unfreeze every block (their optimizer state starts afresh)."""
        super().remove()
        self._apply(list(range(len(self.block_list))))


attach = LISA.attach  # what `dtrain train` calls when algo lists lisa
