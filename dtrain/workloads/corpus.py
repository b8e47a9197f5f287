"""The embedded default corpus: docstrings of Python's standard library, read with `ast`.

Modules are parsed, never imported (some have side effects at import). The text is gathered
once, cached under the user's cache directory keyed by the Python version, and written
atomically so concurrent workers never see a partial file.
"""

from __future__ import annotations

import ast
import hashlib
import os
import sys
import sysconfig
import tempfile
from collections.abc import Callable
from pathlib import Path

SEPARATOR = "\n\n"
MAX_BYTES = 4_000_000  # plenty for a small model; keeps first-use gathering to seconds
SPLIT_BUCKETS = 10_000


def is_validation(doc: str, val_fraction: float) -> bool:
    """Whether ``doc`` goes to validation: by a hash of its content, so the split is deterministic and a
    duplicated document never sits on both sides."""
    h = int.from_bytes(hashlib.blake2b(doc.encode("utf-8"), digest_size=4).digest(), "little")
    return h % SPLIT_BUCKETS < val_fraction * SPLIT_BUCKETS


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` to a temporary file beside ``path``, then rename: concurrent workers never see a
    half-written file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def parse_python(source: str, filename: str = "<unknown>") -> ast.Module:
    """``ast.parse``, retried on CPython 3.11's spurious SystemError (gh-106905): a parse that starts while
    another is under way (a finalizer run by the garbage collector mid-parse that formats a traceback, which
    parses its source line; or another thread) breaks the first one's recursion-depth bookkeeping. The
    retry starts the bookkeeping afresh."""
    for attempt in range(5):
        try:
            return ast.parse(source, filename=filename)
        except SystemError:
            if attempt == 4:
                raise
    raise AssertionError("unreachable")


def _docstrings(source: str) -> list[str]:
    try:
        tree = parse_python(source)
    except (SyntaxError, ValueError):
        return []
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc and len(doc) >= 40:
                out.append(doc)
    return out


def gather_docstrings(root: Path | None = None, *, max_bytes: int = MAX_BYTES) -> str:
    """Docstrings of every .py file under ``root`` (sorted paths, so the order is fixed)."""
    root = root or stdlib_root()
    skip = {"site-packages", "test", "tests", "idlelib", "lib2to3"}
    parts: list[str] = []
    size = 0
    for path in sorted(root.rglob("*.py")):
        if skip.intersection(path.relative_to(root).parts):
            continue
        try:
            source = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        for doc in _docstrings(source):
            parts.append(doc)
            size += len(doc) + len(SEPARATOR)
            if size >= max_bytes:
                return SEPARATOR.join(parts)
    return SEPARATOR.join(parts)


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "dtrain"


def default_corpus() -> str:
    """The stdlib docstring corpus, from the cache when present."""
    key = hashlib.sha1(f"{sys.version}|{stdlib_root()}|{MAX_BYTES}".encode()).hexdigest()[:12]
    path = cache_dir() / f"stdlib_docstrings_{key}.txt"
    if path.exists():
        return path.read_text(encoding="utf-8")
    text = gather_docstrings()
    if len(text) < 100_000:
        raise RuntimeError(f"only {len(text)} characters of docstrings found under {stdlib_root()}; set workload.data_path to a text file")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return text
