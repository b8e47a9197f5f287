"""ctr: an embedding-heavy, DLRM-like click-through model on data drawn from a known logistic model.

The problem instance is fixed by ``data_seed`` (not by the run seed). Each example has
``len(vocab_sizes)`` categorical fields, drawn from Zipf-like distributions (a few ids are
frequent, most are rare, as in real click logs), and ``n_dense`` standard-normal features. The
click probability comes from a known second-order logistic model

    logit = b + sum_f a_f[x_f] + v . dense + sum_{f<g} <u_f[x_f], u_g[x_g]>     (u of rank ``truth_rank``)

and the label is Bernoulli(sigmoid(logit)). Because the true probability p of every validation
example is known, the validation metric is the *expected* log-loss
``val_loss = mean(-p log q - (1 - p) log(1 - q))`` (no label noise in the metric), whose best
possible value is the Bayes log-loss ``bayes_loss = mean(H(p))``, reached only by q = p. The
evaluation reports both and their difference ``excess_loss`` (the mean KL divergence).

Training batches are fresh draws from the same distribution, seeded by (seed, step, rank): an
endless stream, so the gap to ``bayes_loss`` measures optimization, not overfitting.

Model (DLRM): one embedding table per field, a bottom MLP for the dense features, pairwise dot
products of all embedding vectors, and a top MLP on [bottom output, dot products].

Target and budget, the AlgoPerf way (what a tuned NAdamW baseline reaches). NAdamW
(``optimizers.NAdamW``, betas (0.9, 0.999), warm-up 5% then cosine to 0.1x, clip 1.0, batch 256,
one worker, one thread, evaluation every 100 steps); ``bayes_loss`` is 0.4050, a constant
prediction scores 0.6511:
- sweep, seed 0, 2,000 steps: lr in {1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2} x weight decay in {0, 0.1};
  best lr 8e-3 with wd 0.1 (val_loss 0.4342), then 1.6e-2/0.1 (0.4373), 4e-3/0.1 (0.4383).
- that point at the scoring budget of 1,500 steps (``dtrain.scoring.runner.WORKLOAD_RUNS``),
  seeds 0, 1, 2: best val_loss 0.4501 / 0.4359 / 0.4375 (still falling: an excess of ~0.03 nats
  over the Bayes loss remains, mostly on rare ids).
TARGET is the worst seed's best, rounded up to 0.451, so the tuned baseline reaches it on every
seed. 1,500 steps take about 5 s of one core; TIME_BUDGET_S is a wall-clock cap with ample room
for a busy shared machine.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from dtrain.workloads.base import Workload, generator

TARGET = 0.451  # val_loss (expected log-loss, nats); see the module docstring
TIME_BUDGET_S = 120.0


@dataclass
class Config:
    name: str = "ctr"
    data_seed: int = 1234  # the problem instance (true model, validation set); not the run seed
    vocab_sizes: list[int] = field(default_factory=lambda: [2000, 1000, 1000, 500, 200, 100, 50, 10])
    n_dense: int = 4
    zipf_exponent: float = 1.1
    truth_rank: int = 4
    truth_scale: float = 0.6  # std of the true first-order weights; interactions scale with it
    base_logit: float = -1.2
    embed_dim: int = 16
    hidden: int = 64
    batch_size: int = 256
    val_size: int = 20000
    target: float = TARGET  # val_loss (expected log-loss, nats)
    time_budget_s: float = TIME_BUDGET_S


def validate(cfg: Config) -> None:
    for key in ("n_dense", "truth_rank", "embed_dim", "hidden", "batch_size", "val_size"):
        if getattr(cfg, key) < 1:
            raise ValueError(f"workload.{key} must be >= 1, got {getattr(cfg, key)}")
    if len(cfg.vocab_sizes) < 2 or min(cfg.vocab_sizes) < 2:
        raise ValueError(f"workload.vocab_sizes must list at least two fields of at least 2 ids each, got {list(cfg.vocab_sizes)}")
    if cfg.zipf_exponent < 0:
        raise ValueError(f"workload.zipf_exponent must be >= 0, got {cfg.zipf_exponent}")
    if cfg.truth_scale < 0:
        raise ValueError(f"workload.truth_scale must be >= 0, got {cfg.truth_scale}")
    if cfg.time_budget_s <= 0:
        raise ValueError(f"workload.time_budget_s must be > 0, got {cfg.time_budget_s}")


class TrueModel:
    """The known logistic model that labels the data; built from ``data_seed`` alone."""

    def __init__(self, cfg: Config) -> None:
        g = generator(cfg.data_seed, "ctr-truth")
        s = cfg.truth_scale
        self.vocab_sizes = list(cfg.vocab_sizes)
        self.id_probs = []
        for n in self.vocab_sizes:
            p = torch.arange(1, n + 1, dtype=torch.float64).pow(-cfg.zipf_exponent)
            self.id_probs.append((p / p.sum()).float())
        self.first = [torch.randn(n, generator=g) * s for n in self.vocab_sizes]
        inter = s / cfg.truth_rank**0.5
        self.factors = [torch.randn(n, cfg.truth_rank, generator=g) * inter for n in self.vocab_sizes]
        self.dense_w = torch.randn(cfg.n_dense, generator=g) * s
        self.bias = cfg.base_logit
        self.n_dense = cfg.n_dense

    def sample_inputs(self, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.stack([torch.multinomial(p, n, replacement=True, generator=gen) for p in self.id_probs], dim=1)
        dense = torch.randn(n, self.n_dense, generator=gen)
        return ids, dense

    def logit(self, ids: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        out = torch.full((ids.shape[0],), self.bias) + dense @ self.dense_w
        vecs = []
        for f, (a, u) in enumerate(zip(self.first, self.factors)):
            out = out + a[ids[:, f]]
            vecs.append(u[ids[:, f]])
        total = torch.stack(vecs).sum(0)
        # sum_{f<g} <u_f, u_g> = (|sum u|^2 - sum |u|^2) / 2
        out = out + 0.5 * (total.pow(2).sum(1) - sum(v.pow(2).sum(1) for v in vecs))
        return out


class DLRM(nn.Module):
    def __init__(self, *, vocab_sizes: list[int], n_dense: int, embed_dim: int, hidden: int) -> None:
        super().__init__()
        self.embeddings = nn.ModuleList(nn.Embedding(n, embed_dim) for n in vocab_sizes)
        self.bottom = nn.Sequential(nn.Linear(n_dense, hidden), nn.ReLU(), nn.Linear(hidden, embed_dim), nn.ReLU())
        n_vec = len(vocab_sizes) + 1
        self.register_buffer("pairs", torch.triu_indices(n_vec, n_vec, offset=1), persistent=False)
        n_inter = n_vec * (n_vec - 1) // 2
        self.top = nn.Sequential(nn.Linear(embed_dim + n_inter, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, ids: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        bottom = self.bottom(dense)
        vecs = torch.stack([bottom] + [emb(ids[:, f]) for f, emb in enumerate(self.embeddings)], dim=1)
        dots = torch.bmm(vecs, vecs.transpose(1, 2))[:, self.pairs[0], self.pairs[1]]
        return self.top(torch.cat([bottom, dots], dim=1)).squeeze(1)


def init_weights(model: DLRM, gen: torch.Generator) -> None:
    """DLRM-style: embeddings uniform(+-1/sqrt(rows)), linear layers uniform(+-sqrt(1/fan_in)), zero biases."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            else:
                fan = p.shape[0] if name.startswith("embeddings") else p.shape[1]
                bound = fan**-0.5
                p.copy_((torch.rand(p.shape, generator=gen) * 2 - 1) * bound)


def expected_logloss(logit_q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Mean of -p log q - (1 - p) log(1 - q), with q = sigmoid(logit_q); stable in the logit."""
    return F.binary_cross_entropy_with_logits(logit_q, p)


class CTR(Workload):
    name = "ctr"
    metric = "val_loss"
    higher_is_better = False

    def __init__(self, cfg: Config, *, seed: int) -> None:
        super().__init__(cfg, seed=seed)
        self.truth = TrueModel(cfg)
        self.val_ids, self.val_dense = self.truth.sample_inputs(cfg.val_size, generator(cfg.data_seed, "ctr-val"))
        true_logit = self.truth.logit(self.val_ids, self.val_dense)
        self.val_p = torch.sigmoid(true_logit)
        self.bayes_loss = float(expected_logloss(true_logit, self.val_p))  # mean binary entropy of p
        base = self.val_p.mean().clamp(1e-6, 1 - 1e-6)
        self.constant_loss = float(expected_logloss(torch.logit(base).expand_as(self.val_p), self.val_p))

    def build_model(self) -> nn.Module:
        c = self.cfg
        model = DLRM(vocab_sizes=list(c.vocab_sizes), n_dense=c.n_dense, embed_dim=c.embed_dim, hidden=c.hidden)
        init_weights(model, generator(self.seed, "init"))
        return model

    def train_batch(self, step: int, rank: int, world_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        gen = generator(self.seed, "ctr-train", step, rank)
        ids, dense = self.truth.sample_inputs(self.cfg.batch_size, gen)
        p = torch.sigmoid(self.truth.logit(ids, dense))
        clicks = (torch.rand(p.shape, generator=gen) < p).float()
        return ids, dense, clicks

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
        ids, dense, clicks = batch
        device = next(model.parameters()).device
        return F.binary_cross_entropy_with_logits(model(ids.to(device), dense.to(device)), clicks.to(device))

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        logits = torch.cat([
            model(ids.to(device), dense.to(device)).float().cpu()
            for ids, dense in zip(self.val_ids.split(8192), self.val_dense.split(8192))
        ])
        model.train(was_training)
        val_loss = float(expected_logloss(logits, self.val_p))
        return {
            "val_loss": val_loss,
            "bayes_loss": self.bayes_loss,
            "excess_loss": val_loss - self.bayes_loss,
            "constant_loss": self.constant_loss,
        }


def build(cfg: Config, *, seed: int) -> CTR:
    return CTR(cfg, seed=seed)
