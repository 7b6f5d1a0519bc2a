"""Optimizer parameter groups and learning-rate schedules (config groups `optimizer` and `lr_scheduler`)."""

from __future__ import annotations

import math

import torch
from torch import nn

# Only the weights of these layers are decayed: norms, biases, embedding tables (class and null rows
# included) and position tables are not, as in GPT-2/DiT practice.
DECAYED_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d)


def parameter_groups(module: nn.Module) -> list[dict]:
    """Two groups: layer weights (the optimizer's weight_decay applies) and every other trainable one (none)."""
    decayed: dict[int, nn.Parameter] = {}
    for layer in module.modules():
        if isinstance(layer, DECAYED_LAYERS) and layer.weight.requires_grad:
            decayed[id(layer.weight)] = layer.weight
    rest = [p for p in module.parameters() if p.requires_grad and id(p) not in decayed]
    groups = [{"params": list(decayed.values())},
              {"params": rest, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


class Warmup:
    """LR multiplier: linear warmup over `warmup_steps`, then constant, or cosine down to `final_ratio`."""

    def __init__(self, warmup_steps: int = 0, total_steps: int | None = None, final_ratio: float = 1.0):
        if warmup_steps < 0:
            raise ValueError(f"lr_scheduler.warmup_steps must be >= 0, got {warmup_steps}")
        if final_ratio != 1.0 and (total_steps is None or total_steps <= warmup_steps):
            raise ValueError(f"lr_scheduler.total_steps ({total_steps}) must exceed warmup_steps ({warmup_steps}) "
                             "for a decaying schedule")
        self.warmup_steps, self.total_steps, self.final_ratio = warmup_steps, total_steps, final_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.final_ratio == 1.0:
            return 1.0
        progress = min(1.0, (step - self.warmup_steps) / (self.total_steps - self.warmup_steps))
        return self.final_ratio + (1 - self.final_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def constant(optimizer: torch.optim.Optimizer, warmup_steps: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, Warmup(warmup_steps))


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                  final_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, Warmup(warmup_steps, total_steps, final_ratio))
