"""Two real gloo processes holding different shards of the parameters; rank 1's gradients are all zero.

Every optimizer with a global scalar must not hang (the reference D-Adaptation
returns before its all-reduce on such a rank), both ranks must end with the
same scalar, and the sharded run must equal one process holding all shards.
"""
from __future__ import annotations

import os
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import optimizers

STEPS = 6
NAMES = ["prodigy", "dadapt_adam", "dadapt_sgd", "dog", "ldog", "mechanic"]
SHAPES = [(8, 6), (8,), (4, 4)]  # logical tensors; each rank holds half of the rows


class DuckComm:
    """A dtrain-style comm object: all_reduce(list_of_tensors, op="sum") in place."""

    def __init__(self) -> None:
        self.calls = 0

    def all_reduce(self, tensors: list[torch.Tensor], op: str = "sum") -> None:
        assert op == "sum"
        self.calls += 1
        for t in tensors:
            dist.all_reduce(t)


def _full_params() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]


def _full_grads(step: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + step)
    grads = [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]
    for g in grads:
        g[g.shape[0] // 2:] = 0.0  # the rows rank 1 holds: all zero, every step
    return grads


def _shard(t: torch.Tensor, rank: int) -> torch.Tensor:
    half = t.shape[0] // 2
    return t[rank * half:(rank + 1) * half].clone()


def _groups(params: list[torch.Tensor]) -> list[dict[str, Any]]:
    return [{"params": params[:1], "weight_decay": 0.05}, {"params": params[1:], "weight_decay": 0.01}]


def _build(name: str, params: list[torch.Tensor], **dist_kw: Any) -> torch.optim.Optimizer:
    kw: dict[str, Any] = dict(dist_kw)
    if name == "mechanic":
        kw["base_kwargs"] = dict(lr=1e-2)
    return optimizers.create(name, _groups(params), **kw)


def _scalars(name: str, opt: torch.optim.Optimizer) -> list[float]:
    g = opt.param_groups[0]
    if name in ("prodigy", "dadapt_adam", "dadapt_sgd"):
        return [g["d"]]
    if name == "dog":
        return [x["eta"] for x in opt.param_groups] + [x["rbar"] for x in opt.param_groups]
    if name == "ldog":
        return [e for x in opt.param_groups for e in x["eta"]]
    return list(opt.state["_tuner"]["s"])


def _run(name: str, rank: int, **dist_kw: Any) -> tuple[list[float], list[torch.Tensor]]:
    params = [torch.nn.Parameter(_shard(p, rank)) for p in _full_params()]
    opt = _build(name, params, **dist_kw)
    for step in range(STEPS):
        for p, g in zip(params, _full_grads(step)):
            p.grad = _shard(g, rank)
        opt.step()
    return _scalars(name, opt), [p.detach() for p in params]


def _worker(rank: int, init_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    torch.set_num_threads(1)
    try:
        for name in NAMES:
            # one process holding every shard: the answer the sharded run must give
            full = [torch.nn.Parameter(p) for p in _full_params()]
            single = _build(name, full)
            for step in range(STEPS):
                for p, g in zip(full, _full_grads(step)):
                    p.grad = g
                single.step()
            want = _scalars(name, single)

            comm = DuckComm()
            for kw in (dict(process_group=dist.group.WORLD), dict(comm=comm)):
                got, shards = _run(name, rank, **kw)
                both: list[Any] = [None, None]
                dist.all_gather_object(both, got)
                assert both[0] == both[1], f"{name} {list(kw)}: ranks disagree {both}"
                assert got == pytest.approx(want, rel=1e-9), f"{name}: sharded {got} != single {want}"
                for s, f in zip(shards, full):
                    torch.testing.assert_close(s, _shard(f.detach(), rank), rtol=1e-9, atol=1e-12)
            assert comm.calls >= STEPS, f"{name}: comm object not used"
        # Tear down together (as dtrain's torch comm does): a rank that destroys gloo while its peer
        # is still finishing the last all_gather_object can abort at exit, about 1 run in 4 here.
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_sharded_optimizers_over_gloo_with_one_rank_all_zero(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    init_file = str(tmp_path / "rendezvous")
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", os.environ.get("GLOO_SOCKET_IFNAME", "lo"))
    mp.spawn(_worker, args=(init_file,), nprocs=2, join=True)
