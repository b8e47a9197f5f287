"""A tiny regression workload for loop tests; can be told to produce NaN losses on given steps."""

from dataclasses import dataclass, field

import torch
from torch import nn

from dtrain.workloads.base import Workload, generator


@dataclass
class Config:
    name: str = "toy"
    nan_steps: list[int] = field(default_factory=list)
    nan_rank: int = 0
    target: float = 0.05


class Toy(Workload):
    name = "toy"

    def __init__(self, cfg, *, seed):
        super().__init__(cfg, seed=seed)
        self.target = cfg.target
        self.w_true = torch.randn(6, generator=generator(seed, "w"))

    def build_model(self):
        model = nn.Linear(6, 1)
        g = generator(self.seed, "init")
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
        return model

    def train_batch(self, step, rank, world_size):
        x = torch.randn(8, 6, generator=generator(self.seed, step, rank))
        return x, x @ self.w_true, step, rank

    def loss(self, model, batch):
        x, y, step, rank = batch
        loss = ((model(x).squeeze(-1) - y) ** 2).mean()
        if step in self.cfg.nan_steps and rank == self.cfg.nan_rank:
            loss = loss * float("nan")
        return loss

    def evaluate(self, model):
        x = torch.randn(64, 6, generator=generator(self.seed, "val"))
        with torch.no_grad():
            return {"val_loss": float(((model(x).squeeze(-1) - x @ self.w_true) ** 2).mean())}


def build(cfg, *, seed):
    return Toy(cfg, seed=seed)
