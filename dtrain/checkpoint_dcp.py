"""Checkpoints of hierarchical workers through torch.distributed.checkpoint (DCP), resharded on load.

Layout: ``OUT/checkpoints/worker{w}/step_{N:08d}/``, one directory per worker and step, written
by the worker's k processes together:

- DCP's shard files and ``.metadata``: every DTensor of the state (FSDP2's parameters, the
  optimizer state and the outer algorithm's state kept like them), each process writing its shard;
- ``state.pt``: everything else (counters, plain tensors, the run identity), written by the
  worker's process 0 with DTensors replaced by markers. Plain tensors must be the same on all k
  processes; that is checked when saving (a digest per process), never assumed.

A step is written as ``step_N.tmp`` and renamed when all k processes are done, so a directory
named ``step_N`` is complete. Loading builds each DTensor in this run's sharding (Shard(0) over
the worker's processes, as FSDP2 shards), so a run may resume with another ``comm.inner_size``;
the number of workers stays the run's (it is part of the run identity). ``state.pt`` is read with
``weights_only=True``; DCP's metadata is a pickle and is read by an unpickler that admits only
DCP's metadata classes, torch sizes and dtypes.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from dtrain.checkpoint import CheckpointError

_STEP = re.compile(r"^step_(\d{8})$")
_MARK = "__dtensor__"


def worker_dir(out_dir: str | Path, worker: int) -> Path:
    return Path(out_dir) / "checkpoints" / f"worker{worker}"


class Store:
    """`dtrain.checkpoint`'s functions for a hierarchical run: ``rank`` is the worker index (the
    outer comm's rank), and every call is made by all k processes of the worker together."""

    def __init__(self, comm: Any) -> None:
        self.comm = comm

    def rank_dir(self, out_dir: str | Path, rank: int) -> Path:
        return worker_dir(out_dir, rank)

    def steps_available(self, out_dir: str | Path, rank: int) -> list[int]:
        d = worker_dir(out_dir, rank)
        if not d.is_dir():
            return []
        return sorted(int(m.group(1)) for f in d.iterdir() if (m := _STEP.match(f.name)))

    def save(self, out_dir: str | Path, rank: int, step: int, state: dict[str, Any], *, keep: int = 2) -> Path:
        path = worker_dir(out_dir, rank) / f"step_{step:08d}"
        save_state(path, self.comm, state, own=("run",))  # clocks and counters: process 0's stand for the worker
        if self.comm.inner_comm.rank == 0:
            for old in self.steps_available(out_dir, rank)[:-keep]:
                shutil.rmtree(worker_dir(out_dir, rank) / f"step_{old:08d}", ignore_errors=True)
        return path

    def load(self, out_dir: str | Path, rank: int, step: int) -> dict[str, Any]:
        return load_state(worker_dir(out_dir, rank) / f"step_{step:08d}", self.comm)

    def move_aside(self, out_dir: str | Path, dest: Path, *, rank: int) -> None:
        """`dtrain.run_dir.move_aside` for a worker: its process 0 moves the worker's checkpoints
        (worker 0's also the run's files); the others wait for it."""
        from dtrain import run_dir

        if self.comm.inner_comm.rank == 0:
            mine = worker_dir(out_dir, rank)
            if mine.exists():
                (dest / "checkpoints").mkdir(parents=True, exist_ok=True)
                os.replace(mine, dest / "checkpoints" / mine.name)
            run_dir.move_aside(out_dir, dest, rank=rank)  # rank{w} is absent; rank 0 moves the run's files
        self.comm.inner_comm.barrier()


# -- one worker's state ------------------------------------------------------------------------------

def save_state(path: Path, comm: Any, state: dict[str, Any], *, own: tuple[str, ...] = ()) -> None:
    """Write ``state`` (nested dicts/lists; DTensors sharded over ``comm.inner_comm``) as one DCP checkpoint.
    Top-level keys in ``own`` may differ between the worker's processes (process 0's are kept)."""
    from torch.distributed.checkpoint import FileSystemWriter, save

    inner, group = comm.inner_comm, comm.mesh.get_group("inner")
    skeleton, shards = _split(state, "")
    _check_same_on_every_process(inner, {k: v for k, v in skeleton.items() if k not in own})
    tmp = path.with_name(path.name + ".tmp")
    if inner.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    inner.barrier()
    if shards:
        save(shards, storage_writer=FileSystemWriter(str(tmp)), process_group=group)
    if inner.rank == 0:
        with open(tmp / "state.pt", "wb") as f:
            torch.save(skeleton, f)
            f.flush()
            os.fsync(f.fileno())
    inner.barrier()  # every shard is on disk before the directory gets its final name
    if inner.rank == 0:
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    inner.barrier()


def load_state(path: Path, comm: Any) -> dict[str, Any]:
    """``save_state``'s state, DTensors sharded over this run's worker (which may have another k)."""
    if not (path / "state.pt").exists():
        raise CheckpointError(f"checkpoint {path} is missing; resume with a complete out_dir or set resume=false")
    try:
        skeleton = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for a damaged file
        raise CheckpointError(f"checkpoint {path / 'state.pt'} is corrupt ({_first(e)}); delete {path} to resume from "
                              "the one before, or set resume=false") from None
    keys = _markers(skeleton)
    if not keys:
        return skeleton
    from torch.distributed.checkpoint import load
    from torch.distributed.tensor import Shard, empty

    reader = _SafeReader(str(path))
    try:
        meta = reader.read_metadata()
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"checkpoint {path} has unreadable DCP metadata ({_first(e)}); delete {path} to resume from "
                              "the one before, or set resume=false") from None
    mesh = comm.mesh["inner"]
    shards = {}
    for key in keys:
        md = meta.state_dict_metadata.get(key)
        if md is None or not hasattr(md, "size"):
            raise CheckpointError(f"checkpoint {path} lacks the shards of {key}; delete {path} to resume from the one before")
        shards[key] = empty(tuple(md.size), dtype=md.properties.dtype, device_mesh=mesh, placements=[Shard(0)])
    try:
        load(shards, storage_reader=reader, process_group=comm.mesh.get_group("inner"))
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"checkpoint {path} could not be read ({_first(e)}); delete {path} to resume from the one "
                              "before, or set resume=false") from None
    return _join(skeleton, shards)


def load_full(path: str | Path) -> dict[str, Any]:
    """A checkpoint's state with every DTensor read in full, in one process (no process group): for
    inspecting or exporting a sharded run's checkpoint."""
    from torch.distributed.checkpoint import load

    path = Path(path)
    skeleton = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    keys = _markers(skeleton)
    if not keys:
        return skeleton
    reader = _SafeReader(str(path))
    meta = reader.read_metadata()
    full = {k: torch.empty(tuple(meta.state_dict_metadata[k].size), dtype=meta.state_dict_metadata[k].properties.dtype)
            for k in keys}
    load(full, storage_reader=reader, no_dist=True)
    return _join(skeleton, full)


# -- splitting a state into DTensors and the rest ---------------------------------------------------

def _split(obj: Any, prefix: str) -> tuple[Any, dict[str, Any]]:
    if hasattr(obj, "device_mesh"):  # a DTensor
        return {_MARK: prefix}, {prefix: obj.detach()}
    if isinstance(obj, dict):
        out, shards = {}, {}
        for k, v in obj.items():
            out[k], sub = _split(v, f"{prefix}/{k}")
            shards.update(sub)
        return out, shards
    if isinstance(obj, (list, tuple)):
        items, shards = [], {}
        for i, v in enumerate(obj):
            item, sub = _split(v, f"{prefix}/{i}")
            items.append(item)
            shards.update(sub)
        return type(obj)(items) if isinstance(obj, list) else tuple(items), shards
    return obj, {}


def _markers(obj: Any) -> list[str]:
    if isinstance(obj, dict):
        if set(obj) == {_MARK}:
            return [obj[_MARK]]
        return [k for v in obj.values() for k in _markers(v)]
    if isinstance(obj, (list, tuple)):
        return [k for v in obj for k in _markers(v)]
    return []


def _join(obj: Any, shards: dict[str, Any]) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {_MARK}:
            return shards[obj[_MARK]]
        return {k: _join(v, shards) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_join(v, shards) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_join(v, shards) for v in obj)
    return obj


def _digest(obj: Any, path: str = "") -> list[tuple[str, str]]:
    """(path, digest) of every leaf that is not a DTensor."""
    if isinstance(obj, dict):
        return [x for k, v in obj.items() for x in _digest(v, f"{path}/{k}")]
    if isinstance(obj, (list, tuple)):
        return [x for i, v in enumerate(obj) for x in _digest(v, f"{path}/{i}")]
    if isinstance(obj, torch.Tensor):
        data = obj.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes() if obj.numel() else b""
        return [(path, hashlib.sha256(data + str((obj.dtype, tuple(obj.shape))).encode()).hexdigest()[:16])]
    return [(path, hashlib.sha256(repr(obj).encode()).hexdigest()[:16])]


def _check_same_on_every_process(inner: Any, skeleton: Any) -> None:
    """State that is not a DTensor is written once per worker: refuse it if the k processes disagree
    (an algorithm keeping per-shard state as plain tensors would otherwise lose k-1 of them)."""
    if inner.world_size == 1:
        return
    mine = _digest(skeleton)
    for blob in inner.all_gather_bytes(json.dumps(mine).encode()):
        theirs = dict(json.loads(blob.decode()))
        if theirs != dict(mine):
            key = next((k for k, d in mine if theirs.get(k) != d), "?")
            raise CheckpointError(f"state {key.lstrip('/')} differs between the processes of one worker and is not a "
                                  "DTensor, so a sharded checkpoint cannot hold it; use parallel.inner=ddp for this "
                                  "algorithm or set ckpt_every=0")


def _first(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:120]


# -- reading DCP metadata without unpickling arbitrary objects ---------------------------------------

_ALLOWED = {
    "torch.distributed.checkpoint.metadata": None,  # any of its (data)classes
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "builtins": {"set", "frozenset", "slice"},
    "collections": {"OrderedDict"},
    "pathlib": {"PosixPath", "PurePosixPath"},  # storage_meta.checkpoint_id
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        allowed = _ALLOWED.get(module, set())
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout, torch.memory_format)):
            return getattr(torch, name)
        if allowed is None or name in allowed:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of DCP metadata")


def _reader_class() -> type:
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            path = self._get_metadata_path(kwargs.get("rank"))
            with self.fs.create_stream(path, "rb") as f:
                metadata = _MetadataUnpickler(io.BytesIO(f.read())).load()
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader


def _SafeReader(path: str) -> Any:  # noqa: N802 - a factory standing for the class built on first use
    return _reader_class()(path)


