"""Joining a hivemind run under way: the state a live peer sends, and the requests it holds.

A peer that connects while the run is under way (a live record shows collectives done or a
serving loop) is *joining*. `HivemindComm.fetch_state` asks the live peers, smallest rank first,
for their state; the peer asked holds the request (`StateRequests`) until the joiner is admitted
(see `membership`) and its training loop reaches a step boundary, where `serve_state` snapshots
the loop's live state through the provider the loop registered and answers. The answer is a JSON
skeleton plus raw tensor bytes (`encode_state` / `decode_state`): nothing is unpickled, every
tensor's dtype and size are checked. No checkpoint is read or written here.
"""

from __future__ import annotations

import asyncio
import json
import math
from typing import Any

import torch

from dtrain.comm.hivemind.wire import DTYPE_NAMES, DTYPES, WireError, pack, tensor_bytes

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



class StateRequests:
    """Joiners' state requests, each an RPC held open on the node's loop until it is answered."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.waiting: dict[str, asyncio.Future] = {}

    async def wait(self, peer_id: str, timeout: float) -> bytes:
        """Runs on the node's loop: the answer for ``peer_id``, or an error frame after ``timeout``."""
        fut = self.loop.create_future()
        self.waiting[peer_id] = fut
        try:
            return await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            return pack({"ok": False, "error": f"not admitted within {timeout:.0f}s"})
        finally:
            if self.waiting.get(peer_id) is fut:
                del self.waiting[peer_id]

    def answer(self, peer_id: str, frame: bytes) -> None:
        """From any thread: complete ``peer_id``'s request with ``frame``."""
        fut = self.waiting.get(peer_id)
        if fut is not None:
            self.loop.call_soon_threadsafe(lambda: None if fut.done() else fut.set_result(frame))
