"""A user's own model for `dtrain train`: a factory that returns a Workload (tests/test_run_options.py)."""

from __future__ import annotations

import torch
from torch import nn

from dtrain.workloads.base import Workload, generator


class Regression(Workload):
    """Fit a fixed random tanh teacher with a small MLP student."""

    name = "my_regression"
    target = 0.05

    def __init__(self, *, hidden: int, seed: int) -> None:
        super().__init__(None, seed=seed)
        self.hidden = hidden
        self.w_true = torch.randn(8, generator=generator(seed, "teacher"))

    def build_model(self) -> nn.Module:
        model = nn.Sequential(nn.Linear(8, self.hidden), nn.Tanh(), nn.Linear(self.hidden, 1))
        g = generator(self.seed, "init")  # never the global RNG: local workers are threads building at once
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        return model

    def train_batch(self, step: int, rank: int, world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(16, 8, generator=generator(self.seed, step, rank))
        return x, self.teacher(x)

    def teacher(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x @ self.w_true / 3)

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return ((model(x).squeeze(-1) - y) ** 2).mean()

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        x = torch.randn(128, 8, generator=generator(self.seed, "val"))
        with torch.no_grad():
            return {"val_loss": float(((model(x).squeeze(-1) - self.teacher(x)) ** 2).mean())}


def make(hidden: int = 16, seed: int = 0) -> Workload:
    return Regression(hidden=hidden, seed=seed)


def not_a_workload() -> int:
    return 3
