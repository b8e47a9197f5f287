"""Text, tokenizers and on-disk token shards for the `hf_causal_lm` workload.

Documents come from a text file (paragraphs), a folder or glob of text / JSONL files, a JSONL file
(one record per line, its ``text_field``), a `datasets` folder written by ``save_to_disk``, or the
embedded stdlib docstring corpus. Each document goes to validation by a hash of its content (as in
char_lm: deterministic, duplicates never leak). Documents are tokenized once, streamed into
``train.bin`` / ``val.bin`` (uint16 or uint32) under a cache folder keyed by the data's content hash
and the tokenizer, and read back with ``np.memmap``: memory stays flat however large the corpus is.
Concurrent workers (threads or processes) take a file lock, so one of them builds the cache and the
others read it.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob as globlib
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from dtrain.workloads.corpus import cache_dir as dtrain_cache_dir
from dtrain.workloads.corpus import default_corpus, is_validation, write_atomic

FORMAT = 1  # bump when the shard layout changes: old caches are then left alone, not misread
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text")
JSONL_SUFFIXES = (".jsonl", ".json")
EOS_TOKEN = "<|endoftext|>"


def is_dataset_dir(path: Path) -> bool:
    """A folder written by `datasets`' ``save_to_disk`` (a Dataset or a DatasetDict)."""
    return path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()
                              or (path / "state.json").is_file())


def is_glob(path: str) -> bool:
    return any(c in path for c in "*?[")


def data_files(path: str) -> list[Path]:
    """The files a ``data_path`` names (sorted: the order, and so the token stream, is fixed)."""
    if is_glob(path):
        return sorted(Path(p) for p in globlib.glob(path, recursive=True) if Path(p).is_file())
    p = Path(path)
    if p.is_dir():
        # .jsonl only: a folder's .json files are as often configs as data (a .json file named on its own is read as JSONL)
        return sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in (*TEXT_SUFFIXES, ".jsonl"))
    return [p]


def check_data_path(path: str, text_field: str) -> None:
    """One-line ValueError naming ``workload.data_path`` where it cannot be read as text data."""
    if not path:
        return
    where = f"workload.data_path={path}"
    if is_glob(path):
        if not data_files(path):
            raise ValueError(f"{where} matches no files; fix the pattern or point it at a text/JSONL file or folder")
        return
    p = Path(path)
    if not p.exists():
        raise ValueError(f"{where} does not exist; point it at a text or JSONL file, a folder of them, a glob, "
                         "or a datasets save_to_disk folder")
    if p.is_dir() and not is_dataset_dir(p) and not data_files(path):
        raise ValueError(f"{where} holds no {'/'.join((*TEXT_SUFFIXES, '.jsonl'))} files and is not a datasets "
                         "save_to_disk folder; point it at your text")
    if not text_field:
        raise ValueError("workload.text_field must name the field that holds the text (e.g. text)")


# -- documents ------------------------------------------------------------------------------------

def _paragraphs(lines: Iterator[str]) -> Iterator[str]:
    """Blank-line separated paragraphs of a text stream, without holding the whole file."""
    para: list[str] = []
    for line in lines:
        if line.strip():
            para.append(line)
        elif para:
            yield "".join(para).rstrip("\n")
            para = []
    if para:
        yield "".join(para).rstrip("\n")


def _jsonl(path: Path, text_field: str) -> Iterator[str]:
    with path.open(encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise ValueError(f"workload.data_path: {path} line {n} is not JSON; JSONL files need one JSON object per line") from None
            if not isinstance(record, dict) or text_field not in record:
                raise ValueError(f"workload.text_field={text_field!r} is missing from {path} line {n}; set workload.text_field "
                                 "to the field that holds the text")
            text = record[text_field]
            if isinstance(text, str) and text:
                yield text


def _dataset_rows(path: Path, text_field: str) -> Iterator[str]:
    try:
        import datasets
    except ImportError:
        raise ValueError(f"workload.data_path={path} is a datasets folder but `datasets` is not installed; "
                         "pip install 'dtrain[hf]'") from None
    ds: Any = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):  # a DatasetDict: its train split (our own split makes validation)
        ds = ds["train"] if "train" in ds else ds[sorted(ds)[0]]
    if text_field not in ds.column_names:
        raise ValueError(f"workload.text_field={text_field!r} is not a column of {path} (columns: {ds.column_names}); "
                         "set workload.text_field")
    for start in range(0, len(ds), 1000):  # a slice at a time: arrow keeps the rest on disk
        yield from (t for t in ds[start:start + 1000][text_field] if isinstance(t, str) and t)


def documents(path: str, text_field: str) -> Iterator[str]:
    """Every document of ``path`` in a fixed order (empty path: the embedded corpus's paragraphs)."""
    if not path:
        yield from default_corpus().split("\n\n")
        return
    if not is_glob(path) and is_dataset_dir(Path(path)):
        yield from _dataset_rows(Path(path), text_field)
        return
    for f in data_files(path):
        if f.suffix.lower() in JSONL_SUFFIXES:
            yield from _jsonl(f, text_field)
        else:
            with f.open(encoding="utf-8", errors="replace") as fh:
                yield from _paragraphs(fh)


def data_hash(path: str, text_field: str) -> str:
    """A content hash of the data (files read in chunks; the embedded corpus by its text)."""
    h = hashlib.blake2b(digest_size=10)
    h.update(f"{FORMAT}|{text_field}".encode())
    if not path:
        h.update(default_corpus().encode("utf-8"))
        return h.hexdigest()
    files = sorted(f for f in Path(path).rglob("*") if f.is_file()) if not is_glob(path) and is_dataset_dir(Path(path)) \
        else data_files(path)
    for f in files:
        h.update(f.name.encode() + b"\0")
        with f.open("rb") as fh:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()


# -- caching ---------------------------------------------------------------------------------------

def cache_root(cfg_cache_dir: str) -> Path:
    return Path(cfg_cache_dir) if cfg_cache_dir else dtrain_cache_dir() / "hf_causal_lm"


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path``.lock: one builder per cache entry, across threads and processes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{path}.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# -- tokenizers ------------------------------------------------------------------------------------

class ByteTokenizer:
    """UTF-8 bytes (ids 0-255) plus an end-of-document id 256: any text, no training, no files."""

    vocab_size = 257
    eos_id = 256
    fingerprint = "byte"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class TokenizersTokenizer:
    """A `tokenizers` Tokenizer (our trained BPE) behind the same three calls."""

    def __init__(self, tok: Any, fingerprint: str) -> None:
        self.tok, self.fingerprint = tok, fingerprint
        self.vocab_size = int(tok.get_vocab_size())
        self.eos_id = tok.token_to_id(EOS_TOKEN)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids)


class PretrainedTokenizer:
    """A local tokenizer directory, through transformers' AutoTokenizer (no downloads)."""

    def __init__(self, path: str) -> None:
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.vocab_size = len(self.tok)
        self.eos_id = self.tok.eos_token_id
        files = sorted(f for f in Path(path).iterdir() if f.is_file() and f.suffix in (".json", ".txt", ".model"))
        self.fingerprint = "dir-" + hashlib.blake2b(b"".join(f.read_bytes() for f in files), digest_size=8).hexdigest()

    def encode(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids)


def train_bpe(docs: Iterator[str], vocab_size: int) -> Any:
    """A byte-level BPE (no unknown token: every byte has an id) trained on ``docs``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TOKEN], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(docs, trainer=trainer)
    return tok


def bpe_tokenizer(*, root: Path, path: str, text_field: str, digest: str, vocab_size: int, val_fraction: float) -> TokenizersTokenizer:
    """The BPE of this data and vocabulary size: trained on the training split once, then read from
    ``root/bpe-<data hash>-<vocab>.json`` by every later run."""
    from tokenizers import Tokenizer

    file = root / f"bpe-{digest}-v{vocab_size}-f{val_fraction:g}.json"
    with locked(file):
        if not file.exists():
            tok = train_bpe((d for d in documents(path, text_field) if not is_validation(d, val_fraction)), vocab_size)
            write_atomic(file, lambda tmp: tok.save(str(tmp)))
    return TokenizersTokenizer(Tokenizer.from_file(str(file)), fingerprint=file.stem)


# -- token shards ----------------------------------------------------------------------------------

def token_dtype(vocab_size: int) -> type:
    return np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32


def token_shards(*, root: Path, path: str, text_field: str, digest: str, tokenizer: Any,
                 val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) token streams as read-only memmaps, built on first use."""
    folder = root / f"tokens-{digest}-{tokenizer.fingerprint}-f{val_fraction:g}"
    dtype = token_dtype(tokenizer.vocab_size)
    with locked(folder):
        if not (folder / "done").exists():
            folder.mkdir(parents=True, exist_ok=True)
            _tokenize(folder, path, text_field, tokenizer, val_fraction, dtype)
            (folder / "done").write_text(json.dumps({"dtype": np.dtype(dtype).name, "vocab_size": tokenizer.vocab_size}))
    return _open(folder / "train.bin", dtype), _open(folder / "val.bin", dtype)


def _open(file: Path, dtype: type) -> np.ndarray:
    # np.memmap refuses an empty file; an empty split is reported by the workload as too short
    return np.memmap(file, dtype=dtype, mode="r") if file.stat().st_size else np.zeros(0, dtype=dtype)


def _tokenize(folder: Path, path: str, text_field: str, tokenizer: Any, val_fraction: float, dtype: type) -> None:
    """Stream every document's ids (then the end-of-document id) into train.bin / val.bin."""
    eos = [] if tokenizer.eos_id is None else [int(tokenizer.eos_id)]
    outs = {split: open(folder / f"{split}.bin.tmp", "wb") for split in ("train", "val")}  # noqa: SIM115 - closed below
    pending: dict[str, list[int]] = {"train": [], "val": []}
    try:
        for doc in documents(path, text_field):
            split = "val" if is_validation(doc, val_fraction) else "train"
            buf = pending[split]
            buf.extend(tokenizer.encode(doc))
            buf.extend(eos)
            if len(buf) >= 1 << 20:  # flush a few MB at a time
                outs[split].write(np.asarray(buf, dtype=dtype).tobytes())
                buf.clear()
        for split, buf in pending.items():
            outs[split].write(np.asarray(buf, dtype=dtype).tobytes())
    finally:
        for f in outs.values():
            f.close()
    for split in ("train", "val"):
        os.replace(folder / f"{split}.bin.tmp", folder / f"{split}.bin")
