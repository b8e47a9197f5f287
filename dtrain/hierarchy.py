"""Hierarchical workers: a worker is k processes on fast links, outer algorithms run across workers.

Layout: torchrun's W processes form W/k workers of k consecutive ranks; global rank r is process
``r % k`` of worker ``r // k``. A 2-D DeviceMesh with dims ("outer", "inner") of shape (W/k, k):
the "inner" group is one worker's k processes, the "outer" group links process i of every worker.
Inside a worker the model is sharded with FSDP2 (``parallel.inner=fsdp``) or replicated with torch
DDP (``parallel.inner=ddp``); every outer algorithm talks to `OuterComm`, whose collectives span the
outer group only. Under FSDP2 each process's outer step acts on its own shard (`dtrain.comm.flat.local`),
so its outer traffic is 1/k of the model, and process i of worker a meets process i of worker b
(NoLoCo pairs whole workers shard by shard). Under DDP every process of a worker runs the outer step
on the full replica (identical on all k: the same inputs give the same result), so each process
sends a whole model copy over the outer links.

Data: worker w draws ``workload.train_batch(step, w, W/k)`` and its k processes take equal slices
of it (`local_batch`), so a worker's gradient, and the run's trajectory, do not depend on k.

Traffic: the outer comm counts outer bytes as every comm does; FSDP2's all-gathers and
reduce-scatters and DDP's gradient all-reduces are counted on ``comm.inner_comm.stats`` with the same
ring cost model (`dtrain.comm.base`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from dtrain.comm.base import CommStats, ring_allreduce_bytes
from dtrain.comm.torch_backend import TorchComm

INNER_KINDS = ("none", "fsdp", "ddp")
# Optimizers whose step runs on shards with their global scalars summed over the worker (tested).
SHARD_AWARE_OPTIMIZERS = ("adamw", "sgd", "prodigy", "dadapt_adam", "dadapt_sgd", "dog", "ldog")


@dataclass
class Config:
    """The run's ``parallel`` section."""

    inner: str = "none"  # none (a worker is one process) | fsdp | ddp: what joins a worker's comm.inner_size processes
    reshard_after_forward: bool = True  # fsdp: free the gathered parameters after forward (gather again in backward)
    mixed_precision: str = "none"  # fsdp: none | bf16 (compute and gathers in bf16; fp32 parameters and gradient reduction)


def enabled(cfg: Any) -> bool:
    """Whether a run's config asks for hierarchical workers."""
    section = cfg.get("parallel") if hasattr(cfg, "get") else getattr(cfg, "parallel", None)
    return section is not None and section.inner != "none"


def validate(cfg: Any) -> None:
    """Cross-section checks of ``parallel`` and ``comm.inner_size`` (one-line ValueError naming the key)."""
    p = cfg.parallel
    if p.inner not in INNER_KINDS:
        raise ValueError(f"parallel.inner must be one of {', '.join(INNER_KINDS)}, got {p.inner!r}")
    k = int(cfg.comm.get("inner_size", 1))
    if p.inner == "none":
        if k != 1:
            raise ValueError(f"comm.inner_size={k} needs parallel.inner=fsdp or parallel.inner=ddp (what joins a worker's processes)")
        if not p.reshard_after_forward or p.mixed_precision != "none":
            key = "reshard_after_forward" if not p.reshard_after_forward else "mixed_precision"
            raise ValueError(f"parallel.{key} is set but parallel.inner=none; remove it or set parallel.inner=fsdp")
        return
    if p.mixed_precision not in ("none", "bf16"):
        raise ValueError(f"parallel.mixed_precision must be none or bf16, got {p.mixed_precision!r}")
    if cfg.comm.name != "torch":
        raise ValueError(f"parallel.inner={p.inner} needs comm.name=torch (torchrun), got comm.name={cfg.comm.name}")
    if p.inner == "ddp" and (not p.reshard_after_forward or p.mixed_precision != "none"):
        raise ValueError("parallel.reshard_after_forward and parallel.mixed_precision apply to parallel.inner=fsdp only; "
                         "remove them")
    if cfg.get("lisa") is not None:
        raise ValueError(f"LISA's frozen blocks do not compose with parallel.inner={p.inner} yet (FSDP2 units and DDP "
                         "buckets are fixed at wrap time); drop lisa or set parallel.inner=none")
    if cfg.algo.name == "spsa":
        raise ValueError("algo.name=spsa runs forward passes only and sends one byte per step: nothing to shard or "
                         "replicate; set parallel.inner=none")
    algo = cfg.algo
    if p.inner == "fsdp" and (algo.get("robust", "none") != "none" or algo.get("robust_norm_bound", 0.0) > 0):
        raise ValueError("algo.robust/robust_norm_bound under parallel.inner=fsdp would judge each shard apart (norms, "
                         "dropped peers); not supported yet: remove them or use parallel.inner=ddp")
    if p.inner == "fsdp" and algo.get("compression", "none") != "none":
        raise ValueError(f"algo.compression={algo.compression} under parallel.inner=fsdp is not supported yet (its "
                         "error is measured per shard); set algo.compression=none or use parallel.inner=ddp")
    if p.inner == "fsdp" and algo.get("outer_device", "same") != "same":
        raise ValueError("algo.outer_device=cpu under parallel.inner=fsdp is not supported yet (outer state follows "
                         "the shards); set algo.outer_device=same or use parallel.inner=ddp")
    if p.inner == "fsdp" and algo.name == "streaming_noloco":
        raise ValueError("algo.name=streaming_noloco does not run on shards yet; use streaming_diloco or noloco "
                         "under parallel.inner=fsdp, or parallel.inner=ddp")
    if p.inner == "fsdp" and algo.name == "streaming_diloco" and algo.fragments > 1 and not algo.fragment_paths:
        raise ValueError("algo.name=streaming_diloco under parallel.inner=fsdp cuts fragments between whole (sharded) "
                         "tensors: set algo.fragment_paths (module paths per fragment) or algo.fragments=1")
    if p.inner == "fsdp" and cfg.optim.name not in SHARD_AWARE_OPTIMIZERS:
        raise ValueError(f"optim.name={cfg.optim.name} does not step sharded (DTensor) parameters yet; under "
                         f"parallel.inner=fsdp use one of {', '.join(SHARD_AWARE_OPTIMIZERS)}")



@dataclass(frozen=True)
class Layout:
    """One process's place: worker ``worker`` of ``n_workers``, process ``inner_rank`` of its ``inner_size``."""

    rank: int
    world: int
    inner_size: int

    def __post_init__(self) -> None:
        if self.inner_size < 1 or self.world % self.inner_size:
            raise ValueError(f"comm.inner_size={self.inner_size} must divide the number of processes ({self.world}); "
                             f"choose a divisor of {self.world} or launch a multiple of {self.inner_size} processes")

    @property
    def n_workers(self) -> int:
        return self.world // self.inner_size

    @property
    def worker(self) -> int:
        return self.rank // self.inner_size

    @property
    def inner_rank(self) -> int:
        return self.rank % self.inner_size

    @property
    def lead(self) -> bool:
        """Worker 0's process 0: the one that writes the run's files."""
        return self.rank == 0


class OuterComm(TorchComm):
    """The comm outer algorithms use: collectives over the "outer" mesh group (rank = worker index).

    ``inner`` is a `TorchComm` over this worker's processes (its stats count the fast-link traffic);
    ``mesh`` the 2-D DeviceMesh; ``layout`` this process's `Layout`. Failures are posted and watched
    on the whole job (``world``), which this comm also closes.
    """

    def __init__(self, *, inner_size: int, backend: str | None = None, timeout_s: float = 600.0) -> None:
        world = TorchComm(backend=backend, timeout_s=timeout_s)
        layout = Layout(dist.get_rank(), dist.get_world_size(), inner_size)
        from torch.distributed.device_mesh import init_device_mesh

        device = "cuda" if world.backend == "nccl" else "cpu"
        mesh = init_device_mesh(device, (layout.n_workers, inner_size), mesh_dim_names=("outer", "inner"))
        super().__init__(timeout_s=timeout_s, group=mesh.get_group("outer"))
        self.world, self.mesh, self.layout = world, mesh, layout
        self.inner_comm = TorchComm(timeout_s=timeout_s, group=mesh.get_group("inner"))
        if self.rank != layout.worker or self.inner_comm.rank != layout.inner_rank:
            raise RuntimeError(f"mesh layout differs from rank // inner_size (outer rank {self.rank}, worker {layout.worker})")

    def report_failure(self, message: str) -> None:
        self._failed = True
        self.world.report_failure(message)

    def watch_failures(self, on_failure: Any) -> None:
        self.world.watch_failures(on_failure)

    def close(self) -> None:
        super().close()
        self.inner_comm.close()
        self.world.close()


def connect(cfg: Any) -> OuterComm:
    """The outer comm of a run whose ``parallel.inner`` is not none (called by `dtrain train`)."""
    from dtrain.device import comm_backend, kind

    c = cfg.comm
    # comm.backend=auto follows the run's device (nccl for cuda, gloo for cpu): the mesh's device is the backend's
    backend = comm_backend(c.backend, torch.device(kind(cfg.get("device", "auto"))))
    return OuterComm(inner_size=int(c.inner_size), backend=backend, timeout_s=c.timeout_s)


# -- wrapping the model ------------------------------------------------------------------------------

def wrap(model: nn.Module, comm: OuterComm, inner: str, *, reshard_after_forward: bool = True,
         mixed_precision: str = "none") -> nn.Module:
    """``model`` sharded (fsdp) or replicated (ddp) over the worker's processes; inner traffic counted.
    FSDP2 moves the parameters to the mesh's device (a GPU under nccl)."""
    if inner == "fsdp":
        return _fully_shard(model, comm, reshard_after_forward, mixed_precision)
    if inner == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ddp = DistributedDataParallel(model, process_group=comm.mesh.get_group("inner"), broadcast_buffers=False)
        inner = comm.inner_comm
        ddp.register_comm_hook(inner.stats, _counting_allreduce(inner.world_size, comm.mesh.get_group("inner")))
        return ddp
    raise ValueError(f"parallel.inner must be fsdp or ddp to wrap a model, got {inner!r}")


def _fully_shard(model: nn.Module, comm: OuterComm, reshard_after_forward: bool, mixed_precision: str) -> nn.Module:
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    mesh = comm.mesh["inner"]
    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed_precision == "bf16"
              else MixedPrecisionPolicy())
    # One FSDP unit per block of every ModuleList (a transformer's layers), then the root: a block's
    # parameters are gathered only while it runs.
    for module in list(model.modules()):
        if isinstance(module, nn.ModuleList):
            for block in module:
                if any(p.requires_grad for p in block.parameters()):
                    fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=policy)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=policy)
    gather, scatter = _counting_fsdp_comms(comm.inner_comm.stats, comm.inner_comm.world_size)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_custom_all_gather(gather)
            module.set_custom_reduce_scatter(scatter)
    return model


def _counting_fsdp_comms(stats: CommStats, k: int) -> tuple[Any, Any]:
    from torch.distributed.fsdp._fully_shard._fsdp_collectives import DefaultAllGather, DefaultReduceScatter

    class CountingAllGather(DefaultAllGather):
        def __call__(self, output_tensor, input_tensor, group, async_op=False):  # type: ignore[no-untyped-def]
            _count_ring(stats, output_tensor.numel() * output_tensor.element_size(), k, half=True)
            return super().__call__(output_tensor, input_tensor, group, async_op)

    class CountingReduceScatter(DefaultReduceScatter):
        def __call__(self, output_tensor, input_tensor, group, op, async_op=False):  # type: ignore[no-untyped-def]
            _count_ring(stats, input_tensor.numel() * input_tensor.element_size(), k, half=True)
            return super().__call__(output_tensor, input_tensor, group, op, async_op)

    return CountingAllGather(), CountingReduceScatter()


def _count_ring(stats: CommStats, nbytes: int, k: int, *, half: bool) -> None:
    """A ring all-gather or reduce-scatter moves (k-1)/k of the full buffer each way: half an all-reduce."""
    wire = ring_allreduce_bytes(nbytes, k) // (2 if half else 1)
    stats.collectives += 1
    stats.payload_bytes += nbytes // k if half else nbytes
    stats.bytes_sent += wire
    stats.bytes_recv += wire
    stats.messages += (k - 1) * (1 if half else 2)


def _counting_allreduce(k: int, group: dist.ProcessGroup) -> Any:
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    def hook(stats, bucket):  # type: ignore[no-untyped-def] - DDP rejects string annotations here
        buf = bucket.buffer()
        _count_ring(stats, buf.numel() * buf.element_size(), k, half=False)
        return allreduce_hook(group, bucket)

    return hook


# -- data, reductions, state ------------------------------------------------------------------------

def batch_part(batch: Any, parts: int, index: int, *, key: str) -> Any:
    """Slice ``index`` of ``parts`` equal slices (along dim 0) of ``batch``: a tensor, or a tuple, list or dict
    of them (other items are shared by every slice); ``key`` names the setting an uneven batch is refused for."""
    if parts == 1:
        return batch

    def part(t: Any) -> Any:
        if not isinstance(t, torch.Tensor) or t.dim() == 0:
            return t
        if t.shape[0] % parts:
            raise ValueError(f"a batch of {t.shape[0]} rows does not split into {key}={parts} equal parts; "
                             f"choose a batch size divisible by {parts}")
        n = t.shape[0] // parts
        return t[index * n:(index + 1) * n]

    if isinstance(batch, (tuple, list)):
        return type(batch)(part(t) for t in batch)
    if isinstance(batch, dict):
        return {name: part(t) for name, t in batch.items()}
    return part(batch)


def local_batch(batch: Any, comm: OuterComm) -> Any:
    """This process's equal slice (along dim 0) of its worker's batch."""
    return batch_part(batch, comm.layout.inner_size, comm.layout.inner_rank, key="comm.inner_size")


def optimizer_kwargs(cfg: Any, comm: Any) -> dict[str, Any]:
    """What a learning-rate-free optimizer needs under FSDP2: its ``process_group`` is the worker's
    group, so its global scalars (Prodigy's and D-Adaptation's d, DoG's distance) sum over the shards."""
    if getattr(comm, "layout", None) is None or cfg.parallel.inner != "fsdp":
        return {}
    import inspect

    from dtrain.optim import optimizer_class

    if "process_group" not in inspect.signature(optimizer_class(cfg.optim.name).__init__).parameters:
        return {}
    return {"process_group": comm.mesh.get_group("inner")}


def full_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer in full (DTensors gathered over the worker), on CPU."""
    out = {}
    for name, t in model.state_dict().items():
        full = t.full_tensor() if hasattr(t, "full_tensor") else t
        out[name.removeprefix("module.")] = full.detach().cpu().clone()
    return out


# -- what `dtrain train` asks of a run (each a no-op for a flat run) ---------------------------------

def process_rank(comm: Any) -> int:
    """This process's rank in the whole job (a flat run's worker rank)."""
    layout = getattr(comm, "layout", None)
    return comm.rank if layout is None else layout.rank


def is_lead(comm: Any) -> bool:
    """Whether this process writes the run's own files (metrics, summary, run record)."""
    return process_rank(comm) == 0


def all_decided(comm: Any) -> None:
    """A barrier over the whole job: `open_run`'s one agreement (an outer all-reduce) does not order
    the processes of different outer groups, so worker 0's process 0 could write the run's files
    while another process still checks whether out_dir holds a run."""
    if getattr(comm, "layout", None) is not None:
        comm.world.barrier()


def wrap_for_run(model: nn.Module, comm: Any, cfg: Any) -> nn.Module:
    if getattr(comm, "layout", None) is None:
        return model
    p = cfg.parallel
    return wrap(model, comm, p.inner, reshard_after_forward=p.reshard_after_forward, mixed_precision=p.mixed_precision)


def run_batch(batch: Any, comm: Any) -> Any:
    return batch if getattr(comm, "layout", None) is None else local_batch(batch, comm)


def agree_step(params: list[torch.Tensor], max_norm: float, comm: Any, loss: float) -> tuple[bool, float]:
    """One tiny inner reduction after a worker's backward: whether all its k processes may step (every
    loss and the gradient norm finite), and the worker's loss (the mean of its equal slices' losses,
    what an un-sharded worker computes on the whole batch). The gradient norm is summed over the
    worker's shards (FSDP2); with ``max_norm > 0`` the grads are scaled by min(1, max_norm / (norm +
    1e-6)), as torch's clip_grad_norm_ does."""
    from dtrain.comm.flat import local

    grads = [local(p.grad) for p in params if p.grad is not None]
    device = grads[0].device if grads else torch.device("cpu")
    sq = torch.stack([n.float() ** 2 for n in torch._foreach_norm(grads)]).sum() if grads else torch.zeros((), device=device)
    sharded = any(hasattr(p, "device_mesh") for p in params)
    finite = math.isfinite(loss)
    both = torch.stack([sq if sharded else torch.zeros((), device=device),
                        torch.tensor(0.0 if finite else 1.0, device=device),
                        torch.tensor(loss if finite else 0.0, dtype=torch.float32, device=device)])
    k = comm.inner_comm.world_size if comm.inner_comm is not None else 1
    if k > 1:
        comm.inner_comm.all_reduce([both], op="sum")
    norm = (both[0] if sharded else sq).sqrt()
    ok = bool(both[1] == 0) and bool(torch.isfinite(norm))
    if ok and max_norm > 0 and grads:
        torch._foreach_mul_(grads, torch.clamp(max_norm / (norm + 1e-6), max=1.0))
    return ok, float(both[2]) / k if ok else float("nan")



def checkpoint_store(comm: Any) -> Any:
    """Where a run's checkpoints go: `dtrain.checkpoint` per rank, or DCP per worker (`checkpoint_dcp.Store`)."""
    if getattr(comm, "layout", None) is None:
        from dtrain import checkpoint

        return checkpoint
    from dtrain.checkpoint_dcp import Store

    return Store(comm)


def summary_fields(comm: Any, records: list[dict[str, Any]]) -> dict[str, Any]:
    """summary.json's hierarchy keys: the layout, and ``comm_inner`` (fast links) beside ``comm`` (slow links)."""
    layout = getattr(comm, "layout", None)
    if layout is None:
        return {}
    from dtrain.report import aggregate_comm

    return {"hierarchy": {"workers": layout.n_workers, "inner_size": layout.inner_size, "processes": layout.world,
                          "counters": "per process: comm = outer (slow links), comm_inner = inside the worker"},
            "comm_inner": aggregate_comm(records, key="comm_inner")}
