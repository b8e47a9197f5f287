"""digits_cnn: a small convolutional classifier on scikit-learn's bundled 8x8 digits (no download).

Data: the 1,797 images of ``sklearn.datasets.load_digits`` scaled to [0, 1], split once by a
fixed permutation (independent of the run seed) into 1,437 training and 360 validation images.
Training batches walk through per-epoch shuffles drawn from (seed, epoch); worker ``rank`` takes
the global batch ``step * world_size + rank``, with an optional random shift of up to one pixel.

Model: conv(1->32) - ReLU - conv(32->32) - ReLU - maxpool - linear(512->128) - ReLU - linear(10).

Metric: ``val_error`` (the error rate on the 360 validation images, lower is better); the
evaluation also reports ``val_accuracy`` and ``val_loss``.

Target and budget, the AlgoPerf way (what a tuned NAdamW baseline reaches). NAdamW
(``optimizers.NAdamW``, betas (0.9, 0.999), warm-up 5% then cosine to 0.1x, clip 1.0, batch 32,
one worker, one thread, evaluation every 50 steps):
- sweep, seed 0, 1,500 steps: lr in {1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2} x weight decay in {0, 0.1}.
  Every point reaches 0.3-0.8% error; the task saturates by ~700 steps, so the step budget of
  the scoring harness is 800 (``dtrain.scoring.runner.WORKLOAD_RUNS``).
- the shared baseline point (lr 8e-3, wd 0.1, also the best on ctr and seq_rnn), 800 steps,
  seeds 0, 1, 2: best val_error 0.0056 / 0.0083 / 0.0111.
TARGET is the worst seed's best (4 of 360 images wrong), written as the threshold 0.0125 between
4 and 5 errors, so the tuned baseline reaches it on every seed. 800 steps take about 3 s of one
core; TIME_BUDGET_S is a wall-clock cap with ample room for a busy shared machine.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

from dtrain.workloads.base import Workload, generator

N_CLASSES = 10
VAL_SIZE = 360
SPLIT_SEED = 20240611  # the train/validation split is part of the workload, not of the run
TARGET = 0.0125  # val_error; see the module docstring
TIME_BUDGET_S = 120.0


@dataclass
class Config:
    name: str = "digits_cnn"
    batch_size: int = 32
    channels: int = 32
    hidden: int = 128
    augment: bool = True  # random shifts of up to one pixel in each direction
    target: float = TARGET  # val_error
    time_budget_s: float = TIME_BUDGET_S


def validate(cfg: Config) -> None:
    for key in ("batch_size", "channels", "hidden"):
        if getattr(cfg, key) < 1:
            raise ValueError(f"workload.{key} must be >= 1, got {getattr(cfg, key)}")
    if not 0 <= cfg.target <= 1:
        raise ValueError(f"workload.target must be an error rate in [0, 1], got {cfg.target}")
    if cfg.time_budget_s <= 0:
        raise ValueError(f"workload.time_budget_s must be > 0, got {cfg.time_budget_s}")


@lru_cache(maxsize=1)
def load_split() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train, y_train, x_val, y_val); x as float (N, 1, 8, 8) in [0, 1]. Read once per process."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - scikit-learn is a runtime dependency
        raise RuntimeError("workload digits_cnn needs scikit-learn: pip install scikit-learn") from e
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=generator(SPLIT_SEED, "digits-split"))
    val, train = perm[:VAL_SIZE], perm[VAL_SIZE:]
    return x[train], y[train], x[val], y[val]


class DigitsNet(nn.Module):
    def __init__(self, *, channels: int, hidden: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.fc1 = nn.Linear(channels * 16, hidden)
        self.fc2 = nn.Linear(hidden, N_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


def init_weights(model: nn.Module, gen: torch.Generator) -> None:
    """Kaiming-uniform weights (fan-in, ReLU gain) and zero biases, from a private generator."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            else:
                fan_in = p[0].numel()
                bound = (6.0 / fan_in) ** 0.5
                p.copy_((torch.rand(p.shape, generator=gen) * 2 - 1) * bound)


def shift(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Translate each image by (dy, dx) in {-1, 0, 1}^2, filling with zeros."""
    n = x.shape[0]
    padded = F.pad(x, (1, 1, 1, 1))
    offsets = torch.randint(0, 3, (n, 2), generator=gen)
    rows = offsets[:, 0, None] + torch.arange(8)  # (n, 8)
    cols = offsets[:, 1, None] + torch.arange(8)
    idx_n = torch.arange(n)[:, None, None]
    return padded[idx_n, 0, rows[:, :, None], cols[:, None, :]].unsqueeze(1)


class DigitsCNN(Workload):
    name = "digits_cnn"
    metric = "val_error"
    higher_is_better = False

    def __init__(self, cfg: Config, *, seed: int) -> None:
        super().__init__(cfg, seed=seed)
        self.x_train, self.y_train, self.x_val, self.y_val = load_split()
        self._perm: tuple[int, torch.Tensor] | None = None  # (epoch, permutation) cache

    def build_model(self) -> nn.Module:
        model = DigitsNet(channels=self.cfg.channels, hidden=self.cfg.hidden)
        init_weights(model, generator(self.seed, "init"))
        return model

    def _epoch_perm(self, epoch: int) -> torch.Tensor:
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, torch.randperm(len(self.y_train), generator=generator(self.seed, "epoch", epoch)))
        return self._perm[1]

    def train_batch(self, step: int, rank: int, world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        bs = self.cfg.batch_size
        per_epoch = max(1, len(self.y_train) // bs)
        index = step * world_size + rank
        epoch, pos = divmod(index, per_epoch)
        idx = self._epoch_perm(epoch)[pos * bs : (pos + 1) * bs]
        x, y = self.x_train[idx], self.y_train[idx]
        if self.cfg.augment:
            x = shift(x, generator(self.seed, "augment", step, rank))
        return x, y

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        device = next(model.parameters()).device
        return F.cross_entropy(model(x.to(device)), y.to(device))

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        logits = model(self.x_val.to(device)).float()
        y = self.y_val.to(device)
        model.train(was_training)
        acc = float((logits.argmax(1) == y).float().mean())
        return {"val_error": 1.0 - acc, "val_accuracy": acc, "val_loss": float(F.cross_entropy(logits, y))}


def build(cfg: Config, *, seed: int) -> DigitsCNN:
    return DigitsCNN(cfg, seed=seed)
