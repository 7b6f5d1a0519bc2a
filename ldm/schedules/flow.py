"""Rectified flow: a straight line from data to noise, the network predicts the velocity."""

from __future__ import annotations

import torch

from ldm.schedules.base import Parameterization, old_keys
from ldm.schedules.time_samplers import LogitNormal

Tensor = torch.Tensor


def shift_time(t: Tensor, shift: float) -> Tensor:
    """s t / (1 + (s - 1) t): spends more time at high noise for s > 1 (SD3, FLUX)."""
    return shift * t / (1 + (shift - 1) * t)


def from_old_spelling(time_sampler, logit_mean: float | None, logit_std: float | None):
    """`time_sampler: logit_normal` with `logit_mean` / `logit_std` beside it, as configs had them before."""
    if logit_mean is None and logit_std is None:
        return time_sampler
    mean, std = 0.0 if logit_mean is None else logit_mean, 1.0 if logit_std is None else logit_std
    if time_sampler == "logit_normal":
        return LogitNormal(mean, std)
    if time_sampler in (None, "uniform") and (mean, std) == (0.0, 1.0):
        return time_sampler  # old configs carried the unused defaults
    raise ValueError(
        f"{old_keys(logit_mean=logit_mean, logit_std=logit_std)}: old spelling; write "
        "schedule/time_sampler=logit_normal schedule.time_sampler.mean=... schedule.time_sampler.std=..."
    )


class RectifiedFlow(Parameterization):
    """x_t = (1 - t) x0 + t noise; target = noise - x0."""

    def __init__(
        self,
        shift: float = 1.0,
        time_sampler=None,
        loss_weight=None,
        logit_mean: float | None = None,
        logit_std: float | None = None,
    ):
        if shift <= 0:
            raise ValueError(f"schedule.shift must be positive, got {shift}")
        self.shift = shift
        super().__init__(from_old_spelling(time_sampler, logit_mean, logit_std), loss_weight)

    def alpha_sigma(self, t):
        return 1 - t, t

    def model_row(self, t):
        return -torch.ones_like(t), torch.ones_like(t)

    def timesteps(self, n: int) -> Tensor:
        return shift_time(super().timesteps(n), self.shift)

    def sample_t(self, batch_size: int, generator: torch.Generator | None = None) -> Tensor:
        """The time sampler's draws, shifted like the inference grid."""
        return shift_time(super().sample_t(batch_size, generator), self.shift)
