"""hf_causal_lm: a Hugging Face causal LM (GPT-2, Llama, any local checkpoint) on your text.

The model is either built from ``model_type`` and the size keys (random init from the run seed
alone, so every worker builds the same weights) or read from a local ``save_pretrained`` folder
(``model_path``; nothing is downloaded). Text is tokenized once by ``tokenizer`` (``byte``, a
``bpe`` trained on the training split and cached, or a local tokenizer folder) into token shards
read through ``np.memmap`` (see `dtrain.workloads.hf_data`). Loss: causal LM cross-entropy in nats
per token; evaluation reports ``val_loss`` and ``perplexity``. Needs ``pip install 'dtrain[hf]'``.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dtrain.workloads import hf_data
from dtrain.workloads.base import Sample, Workload, generator, stream_seed
from dtrain.workloads.windows import mean_loss, windows

MODEL_TYPES = ("gpt2", "llama")  # the size keys map onto these; other types take model_config only
PROMPT_TOKENS = 8  # a sample's prompt: the first tokens of a validation document
_INIT_LOCK = threading.Lock()  # transformers initialises weights from the global RNG: one build at a time


@dataclass
class Config:
    name: str = "hf_causal_lm"
    # -- model --
    model_type: str = "gpt2"  # gpt2 | llama (size keys below), or any transformers model type with model_config
    model_path: str = ""  # a local save_pretrained folder: its weights and config (model_type and sizes are then unused)
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int = 0  # llama's key/value heads; 0 = n_head
    hidden_size: int = 128
    intermediate_size: int = 0  # 0 = 4 * hidden_size
    dropout: float = 0.0  # also overrides a loaded model's dropout: >0 draws from the global RNG, so resume is not exact
    model_config: dict[str, Any] = field(default_factory=dict)  # any other config attribute, passed as is
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, more compute
    # -- data --
    data_path: str = ""  # text file, folder, glob, JSONL, or a datasets save_to_disk folder; empty = embedded corpus
    text_field: str = "text"  # JSONL / datasets: the field that holds the text
    tokenizer: str = "byte"  # byte | bpe | a local tokenizer folder
    bpe_vocab_size: int = 2048  # tokenizer=bpe: its vocabulary, special tokens included
    cache_dir: str = ""  # token shards and trained tokenizers; empty = ~/.cache/dtrain/hf_causal_lm
    val_fraction: float = 0.05
    seq_len: int = 64
    batch_size: int = 16
    eval_batches: int = 8
    eval_batch_size: int = 16
    target: float = 2.0  # val_loss in nats per token (the byte tokenizer's default; set it for yours)
    time_budget_s: float = 120.0


def validate(cfg: Any) -> None:
    """One-line ValueErrors naming the workload.* key; the data and model folders are checked here, not in a worker."""
    for key in ("n_layer", "n_head", "hidden_size", "seq_len", "batch_size", "eval_batches", "eval_batch_size"):
        if cfg[key] < 1:
            raise ValueError(f"workload.{key} must be >= 1, got {cfg[key]}")
    for key in ("n_kv_head", "intermediate_size"):
        if cfg[key] < 0:
            raise ValueError(f"workload.{key} must be >= 0 (0 = the default), got {cfg[key]}")
    if cfg.hidden_size % cfg.n_head:
        raise ValueError(f"workload.hidden_size ({cfg.hidden_size}) must be divisible by workload.n_head ({cfg.n_head})")
    if cfg.n_kv_head and cfg.n_head % cfg.n_kv_head:
        raise ValueError(f"workload.n_kv_head ({cfg.n_kv_head}) must divide workload.n_head ({cfg.n_head})")
    if not 0 <= cfg.dropout < 1:
        raise ValueError(f"workload.dropout must be in [0, 1), got {cfg.dropout}")
    if not 0 < cfg.val_fraction < 1:
        raise ValueError(f"workload.val_fraction must be in (0, 1), got {cfg.val_fraction}")
    if cfg.bpe_vocab_size < 300:
        raise ValueError(f"workload.bpe_vocab_size must be >= 300 (256 bytes + merges), got {cfg.bpe_vocab_size}")
    check_local("model_path", cfg.model_path)
    if cfg.tokenizer not in ("byte", "bpe"):
        check_local("tokenizer", cfg.tokenizer, what="byte, bpe or a local tokenizer folder")
    if not cfg.model_path and not cfg.model_config and cfg.model_type not in MODEL_TYPES:
        raise ValueError(f"workload.model_type={cfg.model_type!r} has no size keys; use one of {list(MODEL_TYPES)}, "
                         "or give its config in workload.model_config, or a local workload.model_path")
    hf_data.check_data_path(cfg.data_path, cfg.text_field)


def check_local(key: str, path: str, *, what: str = "a local folder written by save_pretrained") -> None:
    """``path`` must be a local folder: a hub name is refused (nothing is downloaded)."""
    if not path or Path(path).is_dir():
        return
    if not Path(path).exists() and path.count("/") <= 1 and not path.startswith((".", "~", "/")):  # looks like org/name
        raise ValueError(f"workload.{key}={path} is not a local folder and dtrain does not download from the hub; "
                         f"download it yourself and pass {what} (e.g. huggingface-cli download {path} --local-dir DIR)")
    raise ValueError(f"workload.{key}={path} is not a folder; pass {what}")


def model_config(cfg: Any, vocab_size: int, eos_id: int | None = None) -> Any:
    """The transformers config the size keys describe, with ``vocab_size`` and ``eos_id`` from the tokenizer."""
    import transformers

    from omegaconf import DictConfig, OmegaConf

    extra = OmegaConf.to_container(cfg.model_config, resolve=True) if isinstance(cfg.model_config, DictConfig) else dict(cfg.model_config)
    inner = cfg.intermediate_size or 4 * cfg.hidden_size
    if cfg.model_type == "gpt2":
        sizes = dict(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.hidden_size, n_inner=inner, n_positions=cfg.seq_len,
                     resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout)
    elif cfg.model_type == "llama":
        sizes = dict(num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_kv_head or cfg.n_head,
                     hidden_size=cfg.hidden_size, intermediate_size=inner, max_position_embeddings=cfg.seq_len,
                     attention_dropout=cfg.dropout)
    else:
        sizes = {}
    ids = {} if eos_id is None else {"bos_token_id": eos_id, "eos_token_id": eos_id}  # the tokenizer's, inside the vocabulary
    return transformers.AutoConfig.for_model(cfg.model_type, **{"vocab_size": vocab_size, **ids, **sizes, **extra})


def _dropout_overrides(config: Any, p: float) -> dict[str, float]:
    """A loaded model's dropout attributes set to ``p`` (pretrained GPT-2 ships 0.1, which would draw
    from the global RNG and make resume inexact)."""
    names = ("resid_pdrop", "embd_pdrop", "attn_pdrop", "attention_dropout", "hidden_dropout", "dropout",
             "hidden_dropout_prob", "attention_probs_dropout_prob")
    return {n: p for n in names if isinstance(getattr(config, n, None), float)}


class HFCausalLM(Workload):
    name = "hf_causal_lm"
    metric = "val_loss"
    higher_is_better = False

    def __init__(self, cfg: Any, *, seed: int) -> None:
        super().__init__(cfg, seed=seed)
        check_local("model_path", cfg.model_path)  # again here: a library user may build without dtrain.config
        if cfg.tokenizer not in ("byte", "bpe"):
            check_local("tokenizer", cfg.tokenizer, what="byte, bpe or a local tokenizer folder")
        root = hf_data.cache_root(cfg.cache_dir)
        digest = hf_data.data_hash(cfg.data_path, cfg.text_field)
        if cfg.tokenizer == "byte":
            self.tokenizer: Any = hf_data.ByteTokenizer()
        elif cfg.tokenizer == "bpe":
            self.tokenizer = hf_data.bpe_tokenizer(root=root, path=cfg.data_path, text_field=cfg.text_field, digest=digest,
                                                   vocab_size=cfg.bpe_vocab_size, val_fraction=cfg.val_fraction)
        else:
            self.tokenizer = hf_data.PretrainedTokenizer(cfg.tokenizer)
        self.train_data, self.val_data = hf_data.token_shards(root=root, path=cfg.data_path, text_field=cfg.text_field,
                                                              digest=digest, tokenizer=self.tokenizer, val_fraction=cfg.val_fraction)
        need = cfg.seq_len + 2
        if len(self.train_data) < need or len(self.val_data) < need:
            raise ValueError(f"workload.data_path has too little text: need more than {need} tokens in both the train "
                             f"({len(self.train_data)}) and validation ({len(self.val_data)}) splits; add text or raise "
                             "workload.val_fraction")

    # -- model ---------------------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        import transformers

        c = self.cfg
        with _INIT_LOCK, torch.random.fork_rng(devices=[]):
            # transformers' _init_weights draws from the global RNG: seed it from the run seed only,
            # and give the caller's RNG state back untouched
            torch.manual_seed(stream_seed(self.seed, "init"))
            if c.model_path:
                config = transformers.AutoConfig.from_pretrained(c.model_path, local_files_only=True)
                model = transformers.AutoModelForCausalLM.from_pretrained(
                    c.model_path, local_files_only=True, dtype=torch.float32, **_dropout_overrides(config, c.dropout))
            else:
                config = model_config(c, self.tokenizer.vocab_size, self.tokenizer.eos_id)
                model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        vocab = model.get_input_embeddings().weight.shape[0]
        if vocab < self.tokenizer.vocab_size:
            raise ValueError(f"workload.tokenizer={c.tokenizer} has {self.tokenizer.vocab_size} tokens but the model at "
                             f"workload.model_path={c.model_path} embeds only {vocab}; use the model's own tokenizer folder")
        positions = getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", None)
        if positions is not None and positions < c.seq_len:
            raise ValueError(f"workload.seq_len={c.seq_len} is longer than the model's {positions} positions; lower workload.seq_len")
        if c.gradient_checkpointing:
            # non-reentrant: works with frozen inputs (LISA) and gives the same gradients as without
            if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.24's name
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False  # training never reuses keys/values; the cache only costs memory
        model.train()
        return model

    # -- data ----------------------------------------------------------------------------------
    def train_batch(self, step: int, rank: int, world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        return windows(self.train_data, seq_len=self.cfg.seq_len, batch_size=self.cfg.batch_size,
                       gen=generator(self.seed, "train", step, rank))

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        device = next(model.parameters()).device
        logits = model(input_ids=x.to(device), use_cache=False).logits
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.to(device).reshape(-1))

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        c = self.cfg
        val = mean_loss(self.loss, model, self.val_data, seq_len=c.seq_len, batches=c.eval_batches,
                        batch_size=c.eval_batch_size, gen=generator(self.seed, "val"))
        return {"val_loss": val, "perplexity": math.exp(min(val, 700.0))}  # exp overflows past ~709

    # -- samples -------------------------------------------------------------------------------
    def prompt(self, seed: int) -> list[int]:
        """The first tokens of a validation document picked by ``seed``: text the model never trained on."""
        v, eos = self.val_data, self.tokenizer.eos_id
        at = int(torch.randint(len(v) - 1, (1,), generator=generator(seed, "sample-prompt")))
        if eos is not None:  # move to the start of the next document (a bounded look-ahead)
            ahead = np.asarray(v[at:at + 4096])
            hits = np.flatnonzero(ahead == eos)
            at = at + int(hits[0]) + 1 if hits.size and at + int(hits[0]) + 1 < len(v) else at
        ids = [int(i) for i in v[at:at + PROMPT_TOKENS]]
        if eos is not None and eos in ids:
            ids = ids[:ids.index(eos)]
        return ids or [int(v[at])]

    def sample(self, model: nn.Module, *, length: int = 120, seed: int = 0, temperature: float = 0.8) -> Sample:
        was_training = model.training
        model.eval()
        try:
            prompt = self.prompt(seed)
            out = generate(model, prompt, length=length, context=self.cfg.seq_len, gen=generator(seed, "sample"),
                           temperature=temperature)
        finally:
            model.train(was_training)
        return Sample(prompt=self.tokenizer.decode(prompt), continuation=self.tokenizer.decode(out), length=len(out),
                      seed=seed, temperature=temperature)


@torch.no_grad()
def generate(model: nn.Module, prompt: list[int], *, length: int, context: int, gen: torch.Generator,
             temperature: float) -> list[int]:
    """``length`` tokens after ``prompt``, one at a time over the last ``context`` tokens; drawn on the
    CPU from ``gen`` (the same text on any device for one seed), greedy when ``temperature`` is 0."""
    device = next(model.parameters()).device
    ids = torch.tensor([prompt], dtype=torch.long, device=device)
    for _ in range(length):
        logits = model(input_ids=ids[:, -context:], use_cache=False).logits[0, -1].float().cpu()
        if temperature > 0:
            nxt = torch.multinomial(torch.softmax(logits / temperature, dim=-1), 1, generator=gen)
        else:
            nxt = logits.argmax().reshape(1)
        ids = torch.cat([ids, nxt.to(device)[None]], dim=1)
    return ids[0, len(prompt):].tolist()


def build(cfg: Any, *, seed: int) -> HFCausalLM:
    try:
        import transformers  # noqa: F401 - checked here so the message says what to install
    except ImportError:
        raise ValueError("workload.name=hf_causal_lm needs transformers; pip install 'dtrain[hf]'") from None
    return HFCausalLM(cfg, seed=seed)
