"""Rectified flow: a straight line from data to noise, the network predicts the velocity."""

from __future__ import annotations

import torch

from ldm.schedules.base import Parameterization
from ldm.schedules.time_samplers import logit_normal_t, uniform_t

Tensor = torch.Tensor

TIME_SAMPLERS = ("uniform", "logit_normal")


def shift_time(t: Tensor, shift: float) -> Tensor:
    """s t / (1 + (s - 1) t): spends more time at high noise for s > 1 (SD3, FLUX)."""
    return shift * t / (1 + (shift - 1) * t)


class RectifiedFlow(Parameterization):
    """x_t = (1 - t) x0 + t noise; target = noise - x0."""

    def __init__(
        self,
        shift: float = 1.0,
        time_sampler: str = "uniform",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
    ):
        if time_sampler not in TIME_SAMPLERS:
            raise ValueError(f"time_sampler must be one of {', '.join(TIME_SAMPLERS)}; got {time_sampler!r}")
        if shift <= 0:
            raise ValueError(f"shift must be positive, got {shift}")
        self.shift = shift
        self.time_sampler = time_sampler
        self.logit_mean = logit_mean
        self.logit_std = logit_std

    def alpha_sigma(self, t):
        return 1 - t, t

    def model_row(self, t):
        return -torch.ones_like(t), torch.ones_like(t)

    def timesteps(self, n: int) -> Tensor:
        return shift_time(super().timesteps(n), self.shift)

    def sample_t(self, batch_size: int, generator: torch.Generator | None = None) -> Tensor:
        if self.time_sampler == "logit_normal":
            t = logit_normal_t(batch_size, self.logit_mean, self.logit_std, generator)
        else:
            t = uniform_t(batch_size, generator)
        return shift_time(t, self.shift)
