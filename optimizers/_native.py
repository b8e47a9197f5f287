"""The native fused CPU kernels (csrc/fused_cpu.c): built with the system C compiler at first use,
loaded through ctypes.

Nothing happens at import time. The first optimizer step that can use a kernel compiles the source
(about a second) into a per-user cache, keyed by the source, the flags, the compiler and the CPU
(``-march=native`` code must not run on another CPU). Without a compiler, or when the build fails,
one warning is raised and the optimizers keep their torch path.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import time
import warnings
from typing import Optional, Sequence

import torch
from torch import Tensor

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc", "fused_cpu.c")
# No -ffast-math: the kernels must keep IEEE rounding and NaN propagation of the torch path.
# -fno-math-errno: sqrt need not set errno (results unchanged), so it vectorises.
# 512-bit vectors where the CPU has them (gcc's default prefers 256): the reductions run ~1.5x faster.
FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-fPIC", "-shared", "-pthread",
         *(("-mprefer-vector-width=512",) if platform.machine().lower() in ("x86_64", "amd64") else ()))
ABI_VERSION = 1

DADAPT_ADAM, DOG_STATS, SGD_UPDATE, SFSGD, PRODIGY_STATS, PRODIGY_UPDATE, SFADAMW = range(7)
DTYPES = {torch.float32: 0, torch.float64: 1}  # the C side's dtype codes
_N_SCALARS = 16  # the C side reads 16 scalars


def _cpu_id() -> str:
    """The machine and the CPU model/feature lines of /proc/cpuinfo where there is one."""
    parts = [platform.machine(), platform.processor()]
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key = line.split(":", 1)[0].strip()
                if key in ("model name", "flags", "Features", "CPU part") and line not in parts:
                    parts.append(line)
                if line.strip() == "":  # the first processor's block is enough
                    break
    except OSError:
        pass
    return "\n".join(parts)


def _cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "dtrain-optimizers")


class Loader:
    """Builds (once per cache key) and loads the kernels; ``lib()`` is None when they cannot be had."""

    def __init__(self, *, cache_dir: Optional[str] = None, source: str = SOURCE) -> None:
        self.cache_dir = cache_dir
        self.source = source
        self._lib: Optional[ctypes.CDLL] = None
        self._tried = False
        self._lock = threading.Lock()
        self.build_seconds: Optional[float] = None  # wall time of this process's build, if it built

    def find_compiler(self) -> Optional[str]:
        cc = os.environ.get("CC")
        return shutil.which(cc) if cc else (shutil.which("cc") or shutil.which("gcc") or shutil.which("clang"))

    def lib(self) -> Optional[ctypes.CDLL]:
        if not self._tried:
            with self._lock:
                if not self._tried:
                    try:
                        self._lib = self._load()
                    except Exception as e:  # never fail a step because of the native build
                        warnings.warn(f"optimizers: native CPU kernels unavailable ({str(e).strip()[:300]}); "
                                      f"using the torch path. Install a C compiler (gcc or clang, e.g. "
                                      f"`apt-get install gcc`) or set CC to enable them.", RuntimeWarning,
                                      stacklevel=4)
                        self._lib = None
                    self._tried = True
        return self._lib

    def _load(self) -> ctypes.CDLL:
        cc = self.find_compiler()
        if cc is None:
            raise RuntimeError("no C compiler found (looked for $CC, cc, gcc, clang)")
        with open(self.source, "rb") as f:
            src = f.read()
        version = subprocess.run([cc, "--version"], capture_output=True, timeout=60).stdout
        key = hashlib.sha256(b"\0".join([src, " ".join(FLAGS).encode(), cc.encode(), version,
                                         _cpu_id().encode()])).hexdigest()[:24]
        cache = self.cache_dir or _cache_dir()
        path = os.path.join(cache, f"fused_cpu-{key}.so")
        if _intact(path):  # a damaged file is never handed to dlopen (a truncated ELF can crash it)
            lib = _open(path)
            if lib is not None:
                return lib
        # missing, damaged or foreign: build anew and publish over it
        os.makedirs(cache, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
        os.close(fd)
        try:
            t0 = time.perf_counter()
            res = subprocess.run([cc, *FLAGS, "-o", tmp, self.source, "-lm"], capture_output=True, text=True,
                                 timeout=300)
            if res.returncode != 0:
                raise RuntimeError(f"{cc} failed: {res.stderr.strip()[-300:]}")
            self.build_seconds = time.perf_counter() - t0
            lib = _open(tmp)  # load the fresh file itself: no other process can have swapped it
            if lib is None:
                raise RuntimeError(f"built {tmp} but could not load it")
            _publish(path + ".sha256", _digest(tmp).encode())  # atomic: concurrent builders each
            os.replace(tmp, path)                                # publish whole files
            return lib
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)


def _digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _intact(path: str) -> bool:
    """Whether ``path`` is the file its builder published: its digest matches the one written beside it."""
    try:
        with open(path + ".sha256") as f:
            return f.read().strip() == _digest(path)
    except OSError:
        return False


def _publish(path: str, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path))
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _open(path: str) -> Optional[ctypes.CDLL]:
    try:
        lib = ctypes.CDLL(path)
        if lib.dtrain_abi_version() != ABI_VERSION:
            return None
    except (OSError, AttributeError):
        return None
    i64, dp, vp = ctypes.c_int64, ctypes.POINTER(ctypes.c_double), ctypes.c_void_p
    lib.dtrain_run.argtypes = [ctypes.c_int, ctypes.c_int, i64, ctypes.POINTER(vp), ctypes.c_int,
                               ctypes.POINTER(i64), dp, dp, dp, ctypes.c_int, ctypes.c_int]
    lib.dtrain_run.restype = ctypes.c_int
    return lib


LOADER = Loader()


def fits(*lists: Sequence[Optional[Tensor]]) -> bool:
    """Whether the kernels can take these parallel lists (None: a zero tensor, where the kernel allows one):
    all on CPU, one float32/float64 dtype, contiguous, the same sizes across lists (the kernels walk raw
    memory)."""
    if not lists or not lists[0] or lists[0][0] is None:
        return False
    t0 = lists[0][0]
    if t0.device.type != "cpu" or t0.dtype not in DTYPES:
        return False
    sizes = [t.numel() for t in lists[0]]
    return all(len(ts) == len(sizes) for ts in lists) and all(
        t is None or (not hasattr(t, "device_mesh")  # a DTensor's pointer is not its shard's: never raw memory
                      and t.device.type == "cpu" and t.dtype == t0.dtype and t.layout == torch.strided
                      and t.is_contiguous() and t.numel() == n)
        for ts in lists for t, n in zip(ts, sizes))


def usable(fused: Optional[bool], *lists: Sequence[Optional[Tensor]]) -> bool:
    """Whether the native kernels run: ``fused`` not False, the tensors fit, and the library builds (the
    cheap checks first, so that nothing is compiled for tensors that could not use it)."""
    return fused is not False and fits(*lists) and LOADER.lib() is not None


def refuse(owner: str, fused: Optional[bool], t: Tensor) -> None:
    """For optimizers whose only fused path is native: ``fused=True`` refuses tensors the kernels can never
    take. Strided tensors and a missing compiler (warned once) fall back to foreach, as elsewhere."""
    if fused and (t.device.type != "cpu" or t.dtype not in DTYPES):
        raise ValueError(f"{owner}: invalid fused=True; the native kernel needs float32/float64 CPU tensors, "
                         f"not {t.dtype} on {t.device.type}; use fused=None")


def run(kernel: int, lists: Sequence[Sequence[Optional[Tensor]]], scalars: Sequence[float], *, nred: int = 0,
        per_tensor: Optional[Sequence[float]] = None) -> Optional[Tensor]:
    """Run ``kernel`` over parallel lists of contiguous tensors (None: a zero tensor where the kernel
    allows one). Returns the (ntensors, nred) float64 per-tensor sums, or None when nred is 0.

    Threads: always native, split by the C side over torch.get_num_threads() threads in fixed chunks
    (the same results for any thread count; no thread below 256K elements each). Measured on the
    benchmark model with 2 threads, the native step beats torch's multi-threaded path for every
    optimizer wired (e.g. D-Adapt Adam 11 vs 44 ms, DoG 12 vs 18 ms): one pass against several, and
    plain threads do not spin when the cores are busy, where torch's OpenMP path slowed 10-100x."""
    lib = LOADER.lib()
    assert lib is not None, "call usable() first"
    first = lists[0]
    n = len(first)
    ptrs = (ctypes.c_void_p * (n * len(lists)))(
        *[t.data_ptr() if t is not None else None for ts in lists for t in ts])
    sizes = (ctypes.c_int64 * n)(*[t.numel() for t in first])
    sc = (ctypes.c_double * _N_SCALARS)(*[float(x) for x in scalars])
    per = (ctypes.c_double * n)(*[float(x) for x in per_tensor]) if per_tensor is not None else None
    out = torch.empty((n, nred), dtype=torch.float64) if nred else None
    out_ptr = ctypes.cast(out.data_ptr(), ctypes.POINTER(ctypes.c_double)) if out is not None else None
    rc = lib.dtrain_run(kernel, DTYPES[first[0].dtype], n, ptrs, len(lists), sizes, sc, per, out_ptr, nred,
                        torch.get_num_threads())
    if rc != 0:
        raise MemoryError("optimizers: native kernel could not allocate its chunk table")
    return out
