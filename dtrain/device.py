"""Where a `dtrain train` worker computes: the run key ``device: auto | cpu | cuda``.

- ``auto`` (the default): ``cuda`` when ``torch.cuda.is_available()``, else ``cpu``.
- ``cuda``: one GPU per process, ``cuda:LOCAL_RANK`` (torchrun's local rank, 0 without torchrun).
  With ``comm.name=local`` the workers are threads of one process: all of them share ``cuda:0``
  (a simulation of N workers on one GPU, not a multi-GPU run; use torchrun for one GPU each).
- ``cpu``: as before this key existed; a CPU run is bit-identical to one without it.

The model is moved before the optimizer and the algorithms are built, so their state (optimizer
moments, and DiLoCo/NoLoCo φ and momentum with ``algo.outer_device=same``) is created beside the
parameters; ``algo.outer_device=cpu`` still keeps the outer state in host memory. Every batch is
moved with `to_device`. Evaluation and samples run on the model's device (the workloads move their
own data there). Checkpoints are loaded onto the CPU and copied into the live state, so a run
checkpointed on one device resumes on the other.

``comm.backend=auto`` follows the device (nccl for cuda, gloo for cpu). ``comm.backend=gloo`` with
``device=cuda`` works: the torch backend stages each collective's buffer through host memory.
``comm.backend=nccl`` with ``device=cpu`` is refused (nccl reduces GPU tensors only).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch

DEVICES = ("auto", "cpu", "cuda")


def check(cfg: Any) -> None:
    """The ``device`` key against this machine and the comm section; raises ValueError with one line."""
    name = cfg.device
    if name not in DEVICES:
        raise ValueError(f"device must be auto, cpu or cuda, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device=cuda but CUDA is not available on this machine (torch.cuda.is_available() is False); "
                         "use device=cpu or device=auto")
    if cfg.comm.get("backend", None) == "nccl" and kind(name) != "cuda":
        raise ValueError("comm.backend=nccl needs device=cuda (nccl reduces GPU tensors only); set comm.backend=gloo "
                         "or auto, or run on a machine with CUDA")
    if name == "cpu" and cfg.get("precision", "fp32") == "fp16":
        raise ValueError("precision=fp16 needs device=cuda (its loss scaling is for GPUs); use precision=bf16 with device=cpu")
    inner = cfg.get("parallel", {}).get("inner", "none")
    if inner != "none" and kind(name) == "cuda" and cfg.comm.get("backend", None) == "gloo":
        raise ValueError(f"parallel.inner={inner} with device=cuda needs comm.backend=nccl or auto (the workers' "
                         "device mesh lives where the backend's tensors do); set comm.backend=auto")


def kind(name: str) -> str:
    """``"cuda"`` or ``"cpu"``: what ``device=name`` means on this machine."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def resolve(name: str, *, local: bool = False) -> torch.device:
    """The torch device of this worker for ``device=name``; ``local``: the workers are threads of one
    process (comm.name=local), all placed on cuda:0. More processes on a node than GPUs share them
    round-robin (LOCAL_RANK modulo the GPU count), which gloo allows and nccl refuses (see `check_sharing`)."""
    if kind(name) == "cpu":
        return torch.device("cpu")
    index = 0 if local else int(os.environ.get("LOCAL_RANK", "0"))
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return torch.device("cuda", index % count if count else index)


def check_sharing(backend: str, device: torch.device) -> None:
    """nccl refuses two ranks on one GPU (a hang or 'Duplicate GPU detected' deep inside): one line instead."""
    if backend != "nccl" or device.type != "cuda":
        return
    procs, gpus = int(os.environ.get("LOCAL_WORLD_SIZE", "1")), torch.cuda.device_count()
    if procs > gpus:
        raise ValueError(f"{procs} processes on this node share {gpus} GPU(s) but nccl needs one GPU per process; "
                         f"launch --nproc-per-node {gpus}, or set comm.backend=gloo to share the GPUs")


def comm_backend(backend: str, device: torch.device) -> str | None:
    """The torch.distributed backend for ``comm.backend`` on ``device`` (None: let the comm choose)."""
    if backend != "auto":
        return backend
    return "nccl" if device.type == "cuda" else "gloo"


def to_device(obj: Any, device: torch.device | str, *, non_blocking: bool = True) -> Any:
    """``obj`` with every tensor moved to ``device``: tensors inside tuples (named ones too), lists and
    dicts at any depth; everything else is returned as it is. A tensor already there is not copied.
    Only copies towards an accelerator are asynchronous: one towards the CPU could be read before it lands."""
    non_blocking = non_blocking and torch.device(device).type != "cpu"
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=non_blocking)
    if isinstance(obj, tuple):
        moved = [to_device(x, device, non_blocking=non_blocking) for x in obj]
        return type(obj)(*moved) if hasattr(obj, "_fields") else type(obj)(moved)  # a namedtuple takes fields
    if isinstance(obj, list):
        return [to_device(x, device, non_blocking=non_blocking) for x in obj]
    if isinstance(obj, Mapping):
        items = {k: to_device(v, device, non_blocking=non_blocking) for k, v in obj.items()}
        return items if type(obj) is dict else type(obj)(items)  # type: ignore[call-arg]
    return obj
