"""Joining a hivemind run that is under way: fetch a live peer's state, resume from it.

A peer that connects while the run's DHT record shows collectives already done is *joining*
(`HivemindComm.joining`). Started with ``resume=true`` (the launcher's ``join`` does that), its
`connect` asks the live peers, smallest rank first, for their newest checkpoint; the answer is
a JSON skeleton plus raw tensor bytes (`encode_state` / `decode_state`: nothing is unpickled,
every tensor's dtype and size are checked). The joiner writes it as its own checkpoint, so the
training loop's ordinary ``resume`` path loads model, optimizer, schedule, algorithm state and
the step counter. The joiner's collectives stay local until that resume agreement (an
all_reduce(min) of the checkpoint step, the loop's last setup collective); from its next
collective on it takes part in the group's rounds (it adopts the leader's round number).
"""

from __future__ import annotations

import json
import logging
import math
from typing import TYPE_CHECKING, Any

import torch

from dtrain import checkpoint
from dtrain.comm.base import CommError
from dtrain.comm.hivemind_wire import DTYPE_NAMES, DTYPES, WireError, pack, tensor_bytes, unpack

if TYPE_CHECKING:
    from dtrain.comm.hivemind import HivemindComm

log = logging.getLogger(__name__)
MAX_DEPTH = 64


def encode_state(state: Any) -> bytes:
    """A nested state dict (tensors, numbers, strings, lists, tuples, dicts) as JSON + raw bytes."""
    blobs: list[bytes] = []
    offset = [0]

    def enc(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous()
            raw = tensor_bytes(t.reshape(-1))
            blobs.append(raw)
            item = {"t": DTYPE_NAMES[t.dtype], "shape": list(t.shape), "at": offset[0], "n": len(raw)}
            offset[0] += len(raw)
            return item
        if isinstance(x, bool) or x is None or isinstance(x, str):
            return {"v": x}
        if isinstance(x, int):
            return {"i": x}
        if isinstance(x, float):
            return {"f": repr(x) if not math.isfinite(x) else x}
        if isinstance(x, dict):
            return {"d": [[enc(k), enc(v)] for k, v in x.items()]}
        if isinstance(x, (list, tuple)):
            return {"l" if isinstance(x, list) else "u": [enc(v) for v in x]}
        raise TypeError(f"cannot send a {type(x).__name__} in a state dict")

    skeleton = json.dumps(enc(state), separators=(",", ":")).encode()
    return len(skeleton).to_bytes(8, "big") + skeleton + b"".join(blobs)


def decode_state(data: bytes) -> Any:
    """Inverse of `encode_state`, validating every node; raises WireError on anything malformed."""
    if len(data) < 8:
        raise WireError("state too short")
    n = int.from_bytes(data[:8], "big")
    if 8 + n > len(data):
        raise WireError("state skeleton overruns the message")
    try:
        skeleton = json.loads(data[8 : 8 + n].decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WireError(f"state skeleton is not JSON ({e})") from None
    blob = memoryview(data)[8 + n :]

    def dec(node: Any, depth: int) -> Any:
        if depth > MAX_DEPTH or not isinstance(node, dict) or len(node) not in (1, 4):
            raise WireError("malformed state node")
        if "t" in node:
            name, shape, at, size = node.get("t"), node.get("shape"), node.get("at"), node.get("n")
            if name not in DTYPES or not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape):
                raise WireError("bad tensor descriptor in state")
            dtype = DTYPES[name]
            numel = math.prod(shape)
            itemsize = torch.empty((), dtype=dtype).element_size()
            if not isinstance(at, int) or not isinstance(size, int) or at < 0 or size != numel * itemsize or at + size > len(blob):
                raise WireError("tensor bytes do not match their descriptor")
            raw = torch.frombuffer(bytearray(blob[at : at + size]), dtype=torch.uint8) if size else torch.empty(0, dtype=torch.uint8)
            return (raw.view(dtype) if size else torch.empty(0, dtype=dtype)).reshape(shape)
        (key, value), = node.items()
        if key == "v" and (value is None or isinstance(value, (bool, str))):
            return value
        if key == "i" and isinstance(value, int):
            return value
        if key == "f":
            if isinstance(value, str) and value in ("nan", "inf", "-inf"):
                return float(value)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
        if key in ("l", "u") and isinstance(value, list):
            items = [dec(v, depth + 1) for v in value]
            return items if key == "l" else tuple(items)
        if key == "d" and isinstance(value, list) and all(isinstance(kv, list) and len(kv) == 2 for kv in value):
            out = {}
            for k, v in value:
                kk = dec(k, depth + 1)
                if not isinstance(kk, (str, int)):
                    raise WireError("state dict key is not a string or integer")
                out[kk] = dec(v, depth + 1)
            return out
        raise WireError(f"malformed state node {key!r}")

    return dec(skeleton, 0)


def serve_state(comm: HivemindComm, header: dict) -> bytes:
    """Answer a joiner: this peer's newest readable checkpoint, or an error frame."""
    state_dir = comm.cfg.state_dir
    for step in reversed(checkpoint.steps_available(state_dir, comm.rank)):
        try:
            state = checkpoint.load(state_dir, comm.rank, step)
            return pack({"ok": True, "step": step, "rank": comm.rank}, encode_state(state))
        except (checkpoint.CheckpointError, TypeError) as e:
            log.warning("hivemind: cannot serve checkpoint step %d: %s", step, e)
    return pack({"ok": False, "error": f"no checkpoint in {state_dir}"})


def fetch_state(comm: HivemindComm) -> tuple[int, dict[str, Any]]:
    """The newest checkpoint of a live peer (smallest rank that has one): (step, state)."""
    comm.refresh()
    errors = []
    for rank, pid in sorted(comm.members.items()):
        if pid == comm.peer_id:
            continue
        try:
            reply = comm.node.run(comm.node.call(pid, pack({"op": "state", "src": comm.rank}), comm.cfg.matchmaking_time * 4))
            header, body = unpack(reply)
            if not header.get("ok"):
                errors.append(f"rank {rank}: {header.get('error')}")
                continue
            state = decode_state(body)
            if not isinstance(state, dict) or not isinstance(header.get("step"), int) or "model" not in state:
                raise WireError("not a training state")
            return header["step"], state
        except Exception as e:  # noqa: BLE001 - try the next peer
            errors.append(f"rank {rank}: {e}")
    raise CommError(f"joining run {comm.cfg.run_id!r}: no live peer could send its state ({'; '.join(errors) or 'no peers'}); "
                    "wait for the run's first checkpoint (ckpt_every) or start a new run_id")


def join(comm: HivemindComm, *, out_dir: str, resume: bool) -> int:
    """Make a joining peer resumable from a live peer's state; returns the step it starts at."""
    if not resume:
        raise CommError(f"run {comm.cfg.run_id!r} is under way: join it with resume=true (or pick another comm.run_id)")
    step, state = fetch_state(comm)
    run_state = state.get("run")
    if isinstance(run_state, dict) and isinstance(run_state.get("comm"), dict):
        run_state["comm"] = {k: 0 for k in run_state["comm"]}  # this peer's traffic starts now
    checkpoint.save(out_dir, comm.rank, step, state)
    comm.activate_after_resume(step)
    log.warning("hivemind: rank %d joins run %r at step %d", comm.rank, comm.cfg.run_id, step)
    return step
