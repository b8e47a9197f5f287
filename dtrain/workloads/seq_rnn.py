"""seq_rnn: a GRU that tracks the hidden state of a known hidden Markov model (online filtering).

The problem instance is fixed by ``data_seed``: an HMM with ``n_states`` hidden states that tend
to persist (self-transition ``stay``, other moves drawn at random) and ``n_symbols`` observed
symbols emitted by overlapping, state-specific distributions. A sequence is a run of the chain;
at every position t the model reads the symbols up to t and predicts the current hidden state.
One symbol alone is ambiguous; the evidence must be carried along the sequence, which is what
the recurrent state is for.

Because the HMM is known, the best possible predictor is the forward (filtering) algorithm. The
evaluation reports the model's ``val_accuracy`` (the metric, higher is better) and ``val_loss``
beside ``bayes_accuracy`` and ``bayes_loss``: what the exact filter achieves on the same fixed
validation sequences, and so the ceiling (and floor) that no model beats beyond noise.

Training batches are fresh sequences seeded by (seed, step, rank).

Target and budget, the AlgoPerf way (what a tuned NAdamW baseline reaches). NAdamW
(``optimizers.NAdamW``, betas (0.9, 0.999), warm-up 5% then cosine to 0.1x, clip 1.0, batch 32,
one worker, one thread, evaluation every 50 steps); the exact filter scores ``bayes_accuracy``
0.5581, one symbol alone about 0.21:
- sweep, seed 0, 1,000 steps: lr in {1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2} x weight decay in {0, 0.1};
  accuracy rises with lr up to 8e-3 (0.5427-0.5441) and 1.6e-2 (0.5432-0.5458); 1e-3 gives 0.51.
- the shared baseline point (lr 8e-3, wd 0.1, also the best on ctr) at the scoring budget of 600
  steps (``dtrain.scoring.runner.WORKLOAD_RUNS``), seeds 0, 1, 2: best val_accuracy 0.5392 /
  0.5389 / 0.5362.
TARGET is the worst seed's best, rounded down to 0.536, so the tuned baseline reaches it on every
seed. 600 steps take about 6 s of one core; TIME_BUDGET_S is a wall-clock cap with ample room for
a busy shared machine.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dtrain.workloads.base import Workload, generator

TARGET = 0.536  # val_accuracy; see the module docstring
TIME_BUDGET_S = 120.0


@dataclass
class Config:
    name: str = "seq_rnn"
    data_seed: int = 4321  # the problem instance (HMM, validation set); not the run seed
    n_states: int = 16
    n_symbols: int = 16
    stay: float = 0.95  # probability that the hidden state persists for one more step
    emission_temp: float = 1.0  # std of the emission logits: larger = more informative symbols
    seq_len: int = 32
    embed_dim: int = 16
    hidden: int = 64
    batch_size: int = 32
    val_sequences: int = 1000
    target: float = TARGET  # val_accuracy
    time_budget_s: float = TIME_BUDGET_S


def validate(cfg: Config) -> None:
    for key in ("n_states", "n_symbols", "seq_len", "embed_dim", "hidden", "batch_size", "val_sequences"):
        if getattr(cfg, key) < 1:
            raise ValueError(f"workload.{key} must be >= 1, got {getattr(cfg, key)}")
    if cfg.n_states < 2 or cfg.n_symbols < 2:
        raise ValueError("workload.n_states and workload.n_symbols must be >= 2")
    if not 0 <= cfg.stay <= 1:
        raise ValueError(f"workload.stay must be a probability in [0, 1], got {cfg.stay}")
    if cfg.emission_temp < 0:
        raise ValueError(f"workload.emission_temp must be >= 0, got {cfg.emission_temp}")
    if not 0 <= cfg.target <= 1:
        raise ValueError(f"workload.target must be an accuracy in [0, 1], got {cfg.target}")
    if cfg.time_budget_s <= 0:
        raise ValueError(f"workload.time_budget_s must be > 0, got {cfg.time_budget_s}")


class HMM:
    """Transition matrix ``trans`` (rows: from), emission matrix ``emit`` (state x symbol), uniform start."""

    def __init__(self, cfg: Config) -> None:
        g = generator(cfg.data_seed, "hmm")
        k, v = cfg.n_states, cfg.n_symbols
        moves = -torch.log(torch.rand(k, k, generator=g))  # Dirichlet(1) rows, after normalising
        moves.fill_diagonal_(0.0)
        moves = moves / moves.sum(1, keepdim=True)
        self.trans = cfg.stay * torch.eye(k) + (1 - cfg.stay) * moves
        self.emit = torch.softmax(torch.randn(k, v, generator=g) * cfg.emission_temp, dim=1)
        self.n_states = k

    def sample(self, n: int, length: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(symbols, states), both (n, length) long."""
        u = torch.rand(2, length, n, 1, generator=gen)  # [transition | emission, t]: contiguous rows
        trans_cdf, emit_cdf = self.trans.cumsum(1), self.emit.cumsum(1)
        states = torch.empty(n, length, dtype=torch.long)
        symbols = torch.empty(n, length, dtype=torch.long)
        z = (u[0, 0, :, 0] * self.n_states).long().clamp_max(self.n_states - 1)
        for t in range(length):
            if t:
                z = torch.searchsorted(trans_cdf[z], u[0, t]).squeeze(1).clamp_max(self.n_states - 1)
            states[:, t] = z
            symbols[:, t] = torch.searchsorted(emit_cdf[z], u[1, t]).squeeze(1).clamp_max(self.emit.shape[1] - 1)
        return symbols, states

    def filter(self, symbols: torch.Tensor) -> torch.Tensor:
        """Exact posteriors P(z_t | x_0..x_t), (n, length, n_states), by the normalised forward algorithm."""
        n, length = symbols.shape
        post = torch.empty(n, length, self.n_states, dtype=torch.float64)
        trans, emit = self.trans.double(), self.emit.double()
        belief = torch.full((n, self.n_states), 1.0 / self.n_states, dtype=torch.float64)
        for t in range(length):
            prior = belief if t == 0 else belief @ trans
            belief = prior * emit[:, symbols[:, t]].T
            belief = belief / belief.sum(1, keepdim=True)
            post[:, t] = belief
        return post


class GRUTagger(nn.Module):
    def __init__(self, *, n_symbols: int, n_states: int, embed_dim: int, hidden: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(n_symbols, embed_dim)
        self.gru = nn.GRU(embed_dim, hidden, batch_first=True)
        self.head = nn.Linear(hidden, n_states)

    def forward(self, symbols: torch.Tensor) -> torch.Tensor:
        out, _ = self.gru(self.embed(symbols))
        return self.head(out)


def init_weights(model: nn.Module, gen: torch.Generator) -> None:
    """Embeddings N(0, 1); other weights uniform(+-1/sqrt(fan_in)) as torch's GRU does; from a private generator."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("embed"):
                p.copy_(torch.randn(p.shape, generator=gen))
            elif name.startswith("gru"):
                bound = model.gru.hidden_size**-0.5
                p.copy_((torch.rand(p.shape, generator=gen) * 2 - 1) * bound)
            elif name.endswith("bias"):
                p.zero_()
            else:
                bound = p.shape[1] ** -0.5
                p.copy_((torch.rand(p.shape, generator=gen) * 2 - 1) * bound)


class SeqRNN(Workload):
    name = "seq_rnn"
    metric = "val_accuracy"
    higher_is_better = True

    def __init__(self, cfg: Config, *, seed: int) -> None:
        super().__init__(cfg, seed=seed)
        self.hmm = HMM(cfg)
        self.val_symbols, self.val_states = self.hmm.sample(cfg.val_sequences, cfg.seq_len, generator(cfg.data_seed, "hmm-val"))
        post = self.hmm.filter(self.val_symbols)
        self.bayes_accuracy = float((post.argmax(-1) == self.val_states).double().mean())
        self.bayes_loss = float(-post.gather(-1, self.val_states[..., None]).clamp_min(1e-300).log().mean())

    def build_model(self) -> nn.Module:
        c = self.cfg
        model = GRUTagger(n_symbols=c.n_symbols, n_states=c.n_states, embed_dim=c.embed_dim, hidden=c.hidden)
        init_weights(model, generator(self.seed, "init"))
        return model

    def train_batch(self, step: int, rank: int, world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.hmm.sample(self.cfg.batch_size, self.cfg.seq_len, generator(self.seed, "hmm-train", step, rank))

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        symbols, states = batch
        device = next(model.parameters()).device
        logits = model(symbols.to(device))
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), states.to(device).reshape(-1))

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        logits = model(self.val_symbols.to(device)).float().cpu()
        model.train(was_training)
        states = self.val_states
        return {
            "val_accuracy": float((logits.argmax(-1) == states).float().mean()),
            "val_loss": float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), states.reshape(-1))),
            "bayes_accuracy": self.bayes_accuracy,
            "bayes_loss": self.bayes_loss,
        }


def build(cfg: Config, *, seed: int) -> SeqRNN:
    return SeqRNN(cfg, seed=seed)
