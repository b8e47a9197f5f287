"""DDP baseline: gradients averaged over all workers before every optimizer step."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dtrain.algorithms.base import AttachContext, Attached, OptimizerHook
from dtrain.comm.base import Comm


@dataclass
class Config:
    name: str = "ddp"
    broadcast_init: bool = True  # start every worker from rank 0's weights


class DDP(OptimizerHook):
    """All-reduce (mean) of the gradients in one fused buffer inside ``optimizer.step()``.

    A worker whose gradients are all missing (it skipped backward on a NaN loss) or non-finite
    contributes zeros and raises a flag carried in the same buffer, so every worker learns of it
    from the one all-reduce and all of them skip the update together: no extra collective and
    no worker left waiting.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, comm: Comm, *, broadcast_init: bool = True) -> None:
        super().__init__(optimizer, comm)
        if broadcast_init:
            with torch.no_grad():
                comm.broadcast(self.params, src=0)

    def before_step(self) -> None:
        params = [p for p in self.params if p.requires_grad]
        if not params:
            return
        dtype, device = params[0].dtype, params[0].device
        grads = [p.grad for p in params]
        # All grads None: this worker skipped its backward (NaN loss). Some None: unused params.
        bad = all(g is None for g in grads)
        flag = torch.zeros(1, dtype=dtype, device=device)
        parts = [torch.zeros_like(p) if g is None else g.to(dtype) for p, g in zip(params, grads)]
        flat = torch.cat([t.reshape(-1) for t in parts] + [flag])
        if bad or not bool(torch.isfinite(flat).all()):
            flat.zero_()
            flat[-1] = 1.0
        self.comm.all_reduce([flat], op="sum")
        if flat[-1].item() > 0:
            self.skip_update()
            return
        flat.div_(self.comm.world_size)
        offset = 0
        for p in params:
            n = p.numel()
            p.grad = flat[offset : offset + n].view_as(p)
            offset += n


def attach(cfg: Config, ctx: AttachContext) -> Attached:
    return Attached(algorithm=DDP(ctx.optimizer, ctx.comm, broadcast_init=cfg.broadcast_init))
