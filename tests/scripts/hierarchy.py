"""Run under torchrun with 4 processes: hierarchical workers (2 workers x 2 processes) against
un-sharded references computed in the same job.

usage: hierarchy.py OUT_DIR
Each check trains a small float64 model through a user's own loop. The reference of a worker is
one un-sharded model that processes the worker's whole batch, with the same outer algorithm over
a plain TorchComm on the same outer group. Rank 0 writes OUT_DIR/result.json with the max abs
differences, per-group collective counts and byte counters; the test asserts on them.
"""

import json
import sys
from collections import Counter
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from dtrain import checkpoint_dcp
from dtrain.algorithms import DDP, DiLoCo, NoLoCo
from dtrain.algorithms.hdet import HDET
from dtrain.algorithms.streaming import StreamingDiLoCo
from dtrain.comm.torch_backend import TorchComm
from dtrain.testing.faults import FaultyComm
from dtrain.hierarchy import OuterComm, full_state, local_batch, wrap
from optimizers import LDoG, DAdaptAdam, DAdaptSGD, DoG, Prodigy

STEPS, H, SAVE_AT = 8, 3, 5


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.blocks = nn.ModuleList([nn.Linear(16, 16) for _ in range(2)])
        self.out = nn.Linear(16, 3)  # 3 rows: shards of unequal size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(x))
        for b in self.blocks:
            h = torch.tanh(b(h)) + h
        return self.out(h)


def make_model() -> nn.Module:
    g = torch.Generator().manual_seed(0)
    model = Net().double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.4)
    return model


def worker_batch(step: int, worker: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + worker)
    x = torch.randn(8, 8, generator=g, dtype=torch.float64)
    return x, torch.stack([x.sum(1).sin(), x[:, 0] * x[:, 1], x[:, 2].cos()], dim=1)


def train(model, opt, steps, worker, split=None, start=0):
    for step in range(start, steps):
        batch = worker_batch(step, worker)
        x, y = split(batch) if split else batch
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), (a.keys(), b.keys())
    return max(float((a[k] - b[k]).abs().max()) for k in a)


class GroupCounter:
    """Counts torch.distributed calls per group (by its global ranks) while installed."""

    NAMES = ("all_reduce", "broadcast", "all_gather", "batch_isend_irecv", "all_gather_single", "reduce_scatter_single",
             "all_gather_into_tensor", "reduce_scatter_tensor", "barrier")

    def __init__(self) -> None:
        self.counts: Counter = Counter()
        self.saved = {n: getattr(dist, n) for n in self.NAMES}

    def __enter__(self):
        for name, fn in self.saved.items():
            setattr(dist, name, self._wrap(name, fn))
        return self

    def _wrap(self, name, fn):
        def call(*args, **kwargs):
            if name == "batch_isend_irecv":
                group = args[0][0].group
            else:
                group = kwargs.get("group")
            ranks = tuple(dist.get_process_group_ranks(group)) if group is not None else tuple(range(dist.get_world_size()))
            self.counts[str(list(ranks))] += 1
            return fn(*args, **kwargs)
        return call

    def __exit__(self, *exc):
        for name, fn in self.saved.items():
            setattr(dist, name, fn)


def main() -> None:
    out = Path(sys.argv[1])
    comm = OuterComm(inner_size=2)
    lay = comm.layout
    split = lambda b: local_batch(b, comm)  # noqa: E731
    ref_comm = TorchComm(group=comm.mesh.get_group("outer"))  # the same outer links, un-sharded workers
    result: dict = {"rank": dist.get_rank(), "worker": lay.worker, "inner_rank": lay.inner_rank,
                    "outer_group": dist.get_process_group_ranks(comm.mesh.get_group("outer")),
                    "inner_group": dist.get_process_group_ranks(comm.mesh.get_group("inner"))}
    diloco = dict(sync_every=H, outer_lr=0.7, outer_momentum=0.9)

    # 1. FSDP2 inside, DiLoCo across; collectives counted per group.
    with GroupCounter() as counter:
        model = wrap(make_model(), comm, "fsdp")
        opt = torch.optim.AdamW(model.parameters(), lr=0.02)
        algo = DiLoCo(opt, comm, **diloco)
        train(model, opt, SAVE_AT, lay.worker, split)
        checkpoint_dcp.save_state(out / f"ckpt{lay.worker}", comm, {"model": model.state_dict(), "optimizer": opt.state_dict(),
                                                      "algorithm": algo.state_dict()})
        train(model, opt, STEPS, lay.worker, split, start=SAVE_AT)
    fsdp = full_state(model)
    result["fsdp_group_counts"] = dict(counter.counts)
    result["fsdp_outer"] = comm.stats.as_dict()
    result["fsdp_inner"] = comm.inner_comm.stats.as_dict()
    result["fsdp_outer_syncs"] = algo.outer_syncs
    result["param_is_dtensor"] = all(hasattr(p, "device_mesh") for p in model.parameters())

    ref = make_model()
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=0.02)
    DiLoCo(ref_opt, ref_comm, **diloco)
    train(ref, ref_opt, STEPS, lay.worker)
    result["diloco_diff"] = max_diff(fsdp, full_state(ref))
    result["ref_outer"] = ref_comm.stats.as_dict()

    # 2. Resume from the DCP checkpoint: a fresh model continues bit-identically.
    model2 = wrap(make_model(), comm, "fsdp")
    opt2 = torch.optim.AdamW(model2.parameters(), lr=0.02)
    algo2 = DiLoCo(opt2, comm, **diloco)
    saved = checkpoint_dcp.load_state(out / f"ckpt{lay.worker}", comm)
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["optimizer"])
    algo2.load_state_dict(saved["algorithm"])
    train(model2, opt2, STEPS, lay.worker, split, start=SAVE_AT)
    resumed = full_state(model2)
    result["resume_bitwise"] = all(torch.equal(resumed[k], fsdp[k]) for k in fsdp)

    # 3. DDP inside, NoLoCo across.
    before = comm.stats.copy()
    model = wrap(make_model(), comm, "ddp")
    opt = torch.optim.AdamW(model.parameters(), lr=0.02)
    NoLoCo(opt, comm, sync_every=H, seed=3)
    train(model, opt, STEPS, lay.worker, split)
    ref = make_model()
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=0.02)
    NoLoCo(ref_opt, ref_comm, sync_every=H, seed=3)
    train(ref, ref_opt, STEPS, lay.worker)
    result["noloco_diff"] = max_diff(full_state(model), full_state(ref))
    result["noloco_outer_bytes"] = (comm.stats - before).bytes_sent

    # 3b. FSDP2 inside, NoLoCo across (pairs of whole workers, shard by shard); its state through DCP.
    model = wrap(make_model(), comm, "fsdp")
    opt = torch.optim.AdamW(model.parameters(), lr=0.02)
    algo = NoLoCo(opt, comm, sync_every=H, seed=3)
    train(model, opt, STEPS, lay.worker, split)
    result["noloco_fsdp_diff"] = max_diff(full_state(model), full_state(ref))
    checkpoint_dcp.save_state(out / f"noloco{lay.worker}", comm, {"algorithm": algo.state_dict()})
    model2 = wrap(make_model(), comm, "fsdp")
    algo2 = NoLoCo(torch.optim.AdamW(model2.parameters(), lr=0.02), comm, sync_every=H, seed=3)
    algo2.load_state_dict(checkpoint_dcp.load_state(out / f"noloco{lay.worker}", comm)["algorithm"])
    result["noloco_state_roundtrip"] = all(torch.equal(a, b) for a, b in zip(algo.phi + algo.momentum,
                                                                               algo2.phi + algo2.momentum))

    # 3d. NoLoCo on shards when one shard arrives bad: process 1 of worker 1 sends NaN in round 1, so
    # process 1 of worker 0 leaves worker 1 out; process 0 of worker 0 heard it fine, yet leaves it out
    # too (the worker's processes agree which members count), and no NaN reaches any weight.
    model = wrap(make_model(), comm, "fsdp")
    opt = torch.optim.AdamW(model.parameters(), lr=0.02)
    outer = comm
    if dist.get_rank() == 3:
        outer = FaultyComm(comm, corrupt="nan", corrupt_from=2, corrupt_until=3)  # call 1: the initial broadcast
        outer.inner_comm = comm.inner_comm
    algo = NoLoCo(opt, outer, sync_every=H, seed=3)
    train(model, opt, H, lay.worker, split)
    result["noloco_bad_shard_failures"] = algo.member_failures
    result["noloco_bad_shard_finite"] = all(bool(torch.isfinite(t).all()) for t in full_state(model).values())

    # 3b'. DDP across workers (gradient mean every step) over FSDP2 and over torch DDP inside a worker.
    for inner in ("fsdp", "ddp"):
        model = wrap(make_model(), comm, inner)
        opt = torch.optim.AdamW(model.parameters(), lr=0.02)
        DDP(opt, comm)
        train(model, opt, STEPS, lay.worker, split)
        ref = make_model()
        ref_opt = torch.optim.AdamW(ref.parameters(), lr=0.02)
        DDP(ref_opt, ref_comm)
        train(ref, ref_opt, STEPS, lay.worker)
        result[f"ddp_over_{inner}_diff"] = max_diff(full_state(model), full_state(ref))

    # 3c. Streaming DiLoCo (2 fragments of whole tensors, overlap 1 step, α-mixing) on shards.
    ends = []
    for sharded in (True, False):
        model = wrap(make_model(), comm, "fsdp") if sharded else make_model()
        opt = torch.optim.AdamW(model.parameters(), lr=0.02)
        streaming = StreamingDiLoCo(opt, comm if sharded else ref_comm, model=model, sync_every=4, fragments=2,
                                    fragment_paths=["inp,out", "blocks"], overlap_steps=1, mix_alpha=0.5)
        train(model, opt, STEPS, lay.worker, split if sharded else None)
        ends.append(full_state(model))
        result[f"streaming_syncs_{'fsdp' if sharded else 'ref'}"] = sum(streaming.fragment_syncs)
    result["streaming_diff"] = max_diff(*ends)

    # 4. The learning-rate-free optimizers' d reduced over the worker's shards equals the un-sharded d.
    for name, make in (("prodigy", Prodigy), ("dadapt_adam", DAdaptAdam), ("dadapt_sgd", lambda ps, **kw: DAdaptSGD(ps, momentum=0.9, **kw)), ("dog", DoG), ("ldog", LDoG)):
        model = wrap(make_model(), comm, "fsdp")
        opt = make(model.parameters(), process_group=comm.mesh.get_group("inner"))
        train(model, opt, STEPS, lay.worker, split)
        ref = make_model()
        ref_opt = make(ref.parameters())
        train(ref, ref_opt, STEPS, lay.worker)
        result[f"{name}_diff"] = max_diff(full_state(model), full_state(ref))
        key = "d" if "d" in opt.param_groups[0] else "rbar"  # DoG's distance scale
        first = [o.param_groups[0][key] for o in (opt, ref_opt)]
        result[f"{name}_d"] = [float(v[0] if isinstance(v, (list, tuple)) else v) for v in first]

    # 5. HDET's replicas are the workers: averaging (parameters and optimizer state) on shards, and its
    # controller fed the worker's loss (the mean of its slices' losses), as an un-sharded worker's.
    hdet = dict(max_lr=0.02, total_steps=STEPS, converge_every=3, auto_lr_alpha=None, auto_lr_warmup=0,
                average_optimizer_state=True)
    ends = []
    for sharded in (True, False):
        model = wrap(make_model(), comm, "fsdp") if sharded else make_model()
        opt = torch.optim.AdamW(model.parameters(), lr=0.02)
        sched = HDET(opt, comm=comm if sharded else ref_comm, **hdet)
        for step in range(STEPS):
            batch = worker_batch(step, lay.worker)
            x, y = split(batch) if sharded else batch
            loss = ((model(x) - y) ** 2).mean()
            loss.backward()
            worker_loss = loss.detach().clone().reshape(1)
            if sharded:
                comm.inner_comm.all_reduce([worker_loss], op="mean")
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step(float(worker_loss))
        ends.append(full_state(model))
        result[f"hdet_lr_{'fsdp' if sharded else 'ref'}"] = opt.param_groups[0]["lr"]
    result["hdet_diff"] = max_diff(*ends)

    records = comm.world.all_gather_bytes(json.dumps(result).encode())
    if dist.get_rank() == 0:
        (out / "result.json").write_text(json.dumps([json.loads(r) for r in records], indent=1))
    ref_comm.close()
    comm.close()


if __name__ == "__main__":
    main()
