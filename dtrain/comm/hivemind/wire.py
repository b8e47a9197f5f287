"""Wire format of the hivemind backend: a JSON header plus raw bytes. Nothing is ever unpickled.

A frame is ``u32 header length | UTF-8 JSON header | body``. Tensors travel as their raw bytes
in the body, with ``dtype`` (a name from `DTYPES`) and ``numel`` in the header; the receiver
checks the dtype name, the byte count and (for floats) finiteness before anything touches a model.
"""

from __future__ import annotations

import json
from typing import Any

import torch

MAX_HEADER = 1 << 20
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16,
    "int8": torch.int8, "uint8": torch.uint8, "int16": torch.int16, "int32": torch.int32, "int64": torch.int64,
    "bool": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


class WireError(ValueError):
    """A frame or tensor that does not parse or validate."""


class NodeError(RuntimeError):
    """The transport failed (peer unreachable, stream broken, daemon gone) or, with ``timed_out``, the
    peer did not answer in time."""

    def __init__(self, message: str, *, timed_out: bool = False) -> None:
        super().__init__(message)
        self.timed_out = timed_out


def pack(header: dict[str, Any], body: bytes | memoryview = b"") -> bytes:
    head = json.dumps(header, allow_nan=False, separators=(",", ":")).encode()
    return len(head).to_bytes(4, "big") + head + bytes(body)


def unpack(frame: bytes) -> tuple[dict[str, Any], bytes]:
    if len(frame) < 4:
        raise WireError("frame shorter than its length prefix")
    n = int.from_bytes(frame[:4], "big")
    if n > MAX_HEADER or 4 + n > len(frame):
        raise WireError(f"header length {n} does not fit a {len(frame)}-byte frame")
    try:
        header = json.loads(frame[4 : 4 + n].decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WireError(f"header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise WireError("header is not a JSON object")
    return header, frame[4 + n :]


def tensor_header(flat: torch.Tensor) -> dict[str, Any]:
    if flat.dtype not in DTYPE_NAMES:
        raise TypeError(f"hivemind backend cannot send dtype {flat.dtype}")
    return {"dtype": DTYPE_NAMES[flat.dtype], "numel": int(flat.numel())}


def tensor_bytes(flat: torch.Tensor) -> bytes:
    t = flat.detach().reshape(-1).contiguous().cpu()
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16: ship the same 2-byte pattern as int16
        t = t.view(torch.int16)
    return t.numpy().tobytes()


def decode_tensor(header: dict[str, Any], body: bytes, *, like: torch.Tensor | None = None, finite: bool = True) -> torch.Tensor:
    """Rebuild a flat tensor from ``header`` and ``body``; validate it against ``like`` if given."""
    name, numel = header.get("dtype"), header.get("numel")
    if name not in DTYPES:
        raise WireError(f"unknown dtype {name!r}")
    if not isinstance(numel, int) or isinstance(numel, bool) or numel < 0:
        raise WireError(f"bad element count {numel!r}")
    dtype = DTYPES[name]
    itemsize = torch.empty((), dtype=dtype).element_size()
    if len(body) != numel * itemsize:
        raise WireError(f"{len(body)} bytes do not hold {numel} x {name}")
    if like is not None:
        if dtype != like.dtype:
            raise WireError(f"dtype {name} != expected {DTYPE_NAMES.get(like.dtype, like.dtype)}")
        if numel != like.numel():
            raise WireError(f"{numel} elements != expected {like.numel()}")
    raw = torch.frombuffer(bytearray(body), dtype=torch.uint8) if numel else torch.empty(0, dtype=torch.uint8)
    out = raw.view(dtype) if numel else torch.empty(0, dtype=dtype)
    if finite and out.is_floating_point() and not bool(torch.isfinite(out).all()):
        raise WireError("non-finite values")
    return out


def pack_list(items: list[bytes]) -> bytes:
    return b"".join(len(b).to_bytes(4, "big") + b for b in items)


def unpack_list(body: bytes, count: int) -> list[bytes]:
    out, pos = [], 0
    for _ in range(count):
        if pos + 4 > len(body):
            raise WireError("truncated list")
        n = int.from_bytes(body[pos : pos + 4], "big")
        if pos + 4 + n > len(body):
            raise WireError("truncated list item")
        out.append(bytes(body[pos + 4 : pos + 4 + n]))
        pos += 4 + n
    if pos != len(body):
        raise WireError("trailing bytes after list")
    return out
