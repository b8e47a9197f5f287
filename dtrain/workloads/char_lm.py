"""char_lm: a small GPT-style byte-level decoder on the stdlib docstring corpus (or your text).

Target: validation loss (nats per byte). The default target is what the NAdamW/AdamW
baseline at the default config reaches in its step budget on one worker; see
``benchmarks/results`` and the README for how it was measured.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dtrain.workloads.base import Sample, Workload, generator
from dtrain.workloads.corpus import default_corpus, is_validation
from dtrain.workloads.windows import mean_loss, windows

VOCAB = 256  # bytes: any user text works without a tokenizer
PROMPT_BYTES = 24  # a sample's prompt: the first words (at most this many bytes) of a validation paragraph


@dataclass
class Config:
    name: str = "char_lm"
    data_path: str = ""  # a UTF-8 text file; empty = the embedded stdlib docstring corpus
    seq_len: int = 64
    batch_size: int = 16
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 128
    val_fraction: float = 0.05
    eval_batches: int = 8
    eval_batch_size: int = 32
    target: float = 2.0  # val_loss (nats/byte)
    time_budget_s: float = 120.0


def validate(cfg: Config) -> None:
    for key in ("seq_len", "batch_size", "n_layer", "n_head", "d_model", "eval_batches", "eval_batch_size"):
        if getattr(cfg, key) < 1:
            raise ValueError(f"workload.{key} must be >= 1, got {getattr(cfg, key)}")
    if cfg.d_model % cfg.n_head:
        raise ValueError(f"workload.d_model ({cfg.d_model}) must be divisible by workload.n_head ({cfg.n_head})")
    if not 0 < cfg.val_fraction < 1:
        raise ValueError(f"workload.val_fraction must be in (0, 1), got {cfg.val_fraction}")
    if cfg.data_path and not Path(cfg.data_path).is_file():
        raise ValueError(f"workload.data_path={cfg.data_path} is not a readable file; point it at a UTF-8 text file or leave it empty")


class Block(nn.Module):
    def __init__(self, d_model: int, n_head: int) -> None:
        super().__init__()
        self.n_head = n_head
        self.ln1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(c, dim=2)
        q, k, v = (y.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for y in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, c))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """Token + position embeddings, ``n_layer`` pre-norm blocks in ``blocks``, final norm, head."""

    def __init__(self, *, vocab: int, seq_len: int, n_layer: int, n_head: int, d_model: int) -> None:
        super().__init__()
        self.tok_emb = nn.Embedding(vocab, d_model)
        self.pos_emb = nn.Embedding(seq_len, d_model)
        self.blocks = nn.ModuleList(Block(d_model, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.tok_emb(idx) + self.pos_emb(pos)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def init_weights(model: nn.Module, gen: torch.Generator) -> None:
    """GPT-2 style init from a private generator (the global RNG is left alone)."""
    n_layer = sum(1 for _ in model.modules() if isinstance(_, Block)) or 1
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                std = 0.02 / math.sqrt(2 * n_layer) if name.endswith(("proj.weight", "mlp.2.weight")) else 0.02
                p.copy_(torch.randn(p.shape, generator=gen) * std)
            elif name.endswith("weight"):  # LayerNorm gains
                p.fill_(1.0)
            else:
                p.zero_()


@torch.no_grad()
def generate(model: nn.Module, prompt: torch.Tensor, *, length: int, context: int, gen: torch.Generator,
             temperature: float) -> torch.Tensor:
    """``length`` bytes that ``model`` writes after ``prompt`` (1-D byte ids), one at a time, seeing
    at most ``context`` bytes (its position table's size); greedy when ``temperature`` is 0."""
    device = next(model.parameters()).device
    ids = prompt.long().to(device)[None]
    for _ in range(length):
        # drawn on the CPU from a CPU generator: the same bytes on any device for one seed
        logits = model(ids[:, -context:])[0, -1].float().cpu()
        if temperature > 0:
            nxt = torch.multinomial(torch.softmax(logits / temperature, dim=-1), 1, generator=gen)
        else:
            nxt = logits.argmax().reshape(1)
        ids = torch.cat([ids, nxt.to(device)[None]], dim=1)
    return ids[0, prompt.numel():].cpu()


def split_text(text: str, val_fraction: float) -> tuple[bytes, bytes]:
    """Paragraphs go to validation by a hash of their content: deterministic, and duplicates never leak."""
    train, val = [], []
    for para in text.split("\n\n"):
        (val if is_validation(para, val_fraction) else train).append(para)
    return "\n\n".join(train).encode("utf-8"), "\n\n".join(val).encode("utf-8")


class CharLM(Workload):
    name = "char_lm"
    metric = "val_loss"
    higher_is_better = False

    def __init__(self, cfg: Config, *, seed: int) -> None:
        super().__init__(cfg, seed=seed)
        text = self._read_text(cfg.data_path) if cfg.data_path else default_corpus()
        train, val = split_text(text, cfg.val_fraction)
        need = cfg.seq_len + 2
        if len(train) < need or len(val) < need:
            raise ValueError(f"workload.data_path text is too short: need more than {need} bytes in both train and validation splits")
        self.train_data = torch.frombuffer(bytearray(train), dtype=torch.uint8)
        self.val_data = torch.frombuffer(bytearray(val), dtype=torch.uint8)

    def _read_text(self, path: str) -> str:
        """The file as UTF-8 text; a file that is not text trains all the same, with a warning."""
        raw = Path(path).read_bytes()
        text = raw.decode("utf-8", errors="replace")
        bad = text.count("\ufffd") + text.count("\x00")
        if bad > 0.01 * len(text):
            self.note(f"workload.data_path={path} does not look like UTF-8 text ({bad / len(text):.0%} of its characters "
                      "are undecodable or NUL); the model learns those bytes: point it at a text file")
        return text

    def build_model(self) -> nn.Module:
        c = self.cfg
        model = GPT(vocab=VOCAB, seq_len=c.seq_len, n_layer=c.n_layer, n_head=c.n_head, d_model=c.d_model)
        init_weights(model, generator(self.seed, "init"))
        return model

    def train_batch(self, step: int, rank: int, world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        return windows(self.train_data, seq_len=self.cfg.seq_len, batch_size=self.cfg.batch_size,
                       gen=generator(self.seed, "train", step, rank))

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        device = next(model.parameters()).device
        logits = model(x.to(device))
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.to(device).reshape(-1))

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        c = self.cfg
        return {"val_loss": mean_loss(self.loss, model, self.val_data, seq_len=c.seq_len, batches=c.eval_batches,
                                      batch_size=c.eval_batch_size, gen=generator(self.seed, "val"))}

    def prompt(self, seed: int) -> bytes:
        """The first words of a validation paragraph picked by ``seed``: text the model never trained on."""
        v = self.val_data
        starts = (((v[:-2] == 10) & (v[1:-1] == 10)).nonzero().flatten() + 2).tolist() or [0]
        at = starts[int(torch.randint(len(starts), (1,), generator=generator(seed, "sample-prompt")))]
        head = bytes(v[at:at + PROMPT_BYTES].tolist()).split(b"\n")[0]
        cut = head.rfind(b" ", 1)  # end on a word boundary when the paragraph's first line allows it
        return (head[:cut + 1] if cut > 0 and len(head) == PROMPT_BYTES else head) or b"\n"

    def sample(self, model: nn.Module, *, length: int = 120, seed: int = 0, temperature: float = 0.8) -> Sample:
        was_training = model.training
        model.eval()
        try:
            prompt = self.prompt(seed)
            out = generate(model, torch.tensor(list(prompt)), length=length, context=self.cfg.seq_len,
                           gen=generator(seed, "sample"), temperature=temperature)
        finally:
            model.train(was_training)
        decode = lambda b: b.decode("utf-8", errors="replace")  # noqa: E731 - an undertrained model writes any byte
        return Sample(prompt=decode(prompt), continuation=decode(bytes(out.tolist())), length=int(out.numel()),
                      seed=seed, temperature=temperature)


def build(cfg: Config, *, seed: int) -> CharLM:
    return CharLM(cfg, seed=seed)
