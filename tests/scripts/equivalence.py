"""Run under torchrun: DDP and DiLoCo against single-process references computed on rank 0 (DDP also
against torch's DistributedDataParallel on the same batches).

usage: equivalence.py {ddp|diloco} OUT.json
Each rank trains a small MLP with SGD on its own deterministic batches through the algorithm's
hook; rank 0 recomputes the same training in one process (concatenated batch for DDP, N model
copies averaged every H steps for DiLoCo) and writes the max abs difference and the counters.
"""

import copy
import json
import sys

import torch
from torch import nn

from dtrain.algorithms import DDP, DiLoCo
from dtrain.comm.torch_backend import TorchComm

STEPS, H, LR = 12, 4, 0.1


def model_and_opt(seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer]:
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)
    return model, torch.optim.SGD(model.parameters(), lr=LR)


def batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(4, 8, generator=g, dtype=torch.float64)
    return x, x.sum(dim=1, keepdim=True).sin()


def loss_of(model: nn.Module, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
    return ((model(xb) - yb) ** 2).mean()


def main() -> None:
    which, out = sys.argv[1], sys.argv[2]
    comm = TorchComm()
    rank, n = comm.rank, comm.world_size
    model, opt = model_and_opt()
    if which == "ddp":
        algo = DDP(opt, comm)
    else:
        algo = DiLoCo(opt, comm, sync_every=H, outer_lr=1.0, outer_momentum=0.0, nesterov=False)
    before = comm.stats.copy()
    for step in range(STEPS):
        loss_of(model, *batch(step, rank)).backward()
        opt.step()
        opt.zero_grad()
    window = (comm.stats - before).as_dict()
    torch_ddp = None
    if which == "ddp":  # the real baseline on the same batches: torch's DistributedDataParallel
        base, base_opt = model_and_opt()
        wrapped = nn.parallel.DistributedDataParallel(base)
        for step in range(STEPS):
            loss_of(wrapped, *batch(step, rank)).backward()
            base_opt.step()
            base_opt.zero_grad()
        torch_ddp = max((a - b).abs().max().item() for a, b in zip(model.parameters(), base.parameters()))
    if rank == 0:
        if which == "ddp":
            ref, ref_opt = model_and_opt()
            for step in range(STEPS):
                parts = [batch(step, r) for r in range(n)]
                loss_of(ref, torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])).backward()
                ref_opt.step()
                ref_opt.zero_grad()
        else:
            base, _ = model_and_opt()
            workers = [copy.deepcopy(base) for _ in range(n)]
            opts = [torch.optim.SGD(w.parameters(), lr=LR) for w in workers]
            for step in range(STEPS):
                for r, (w, o) in enumerate(zip(workers, opts)):
                    loss_of(w, *batch(step, r)).backward()
                    o.step()
                    o.zero_grad()
                if (step + 1) % H == 0:
                    with torch.no_grad():
                        for ps in zip(*(w.parameters() for w in workers)):
                            mean = torch.stack(ps).mean(0)
                            for p in ps:
                                p.copy_(mean)
            ref = workers[0]
        diff = max((a - b).abs().max().item() for a, b in zip(model.parameters(), ref.parameters()))
        moved = max((a - b).abs().max().item() for a, b in zip(model.parameters(), model_and_opt()[0].parameters()))
        json.dump({"max_abs_diff": diff, "moved": moved, "torch_ddp_diff": torch_ddp, "world_size": n, "steps": STEPS, "H": H, "window": window}, open(out, "w"))
    comm.close()


if __name__ == "__main__":
    main()
