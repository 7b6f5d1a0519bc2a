"""The shared data row of the discrete variance-preserving methods (ddpm, v, x0)."""

from __future__ import annotations

import torch

from ldm.schedules.base import Parameterization, old_keys
from ldm.schedules.beta_schedules import alphas_cumprod
from ldm.schedules.loss_weights import MinSNRWeight, NoWeight

Tensor = torch.Tensor

TIME_INPUTS = ("unit", "level")
# A level time (k + 1) / N carried in float32 lands within ~1e-4 of k + 1 once scaled by N <= 10^4;
# anything farther from an integer is a time between levels and is passed on unrounded.
LEVEL_SNAP = 1e-3


def from_old_spelling(loss_weighting: str | None, min_snr_gamma: float | None, loss_weight) -> object:
    """The `loss_weighting` + `min_snr_gamma` keys that configs had before `loss_weight` (old run directories)."""
    if loss_weight is not None:
        raise ValueError(
            f"{old_keys(loss_weighting=loss_weighting, min_snr_gamma=min_snr_gamma)}: old spelling of "
            "schedule.loss_weight; write schedule.loss_weight=min_snr (and "
            "schedule/loss_weight=min_snr schedule.loss_weight.gamma=5 for another gamma), without the old keys"
        )
    name = "none" if loss_weighting is None else loss_weighting
    if name == "none":
        return NoWeight()
    if name == "min_snr":
        return MinSNRWeight(5.0 if min_snr_gamma is None else min_snr_gamma)
    raise ValueError(f"schedule.loss_weighting must be one of none, min_snr; got {name!r}")


class VPSchedule(Parameterization):
    """alpha = sqrt(alphas_cumprod), sigma = sqrt(1 - alphas_cumprod), at t = (k + 1) / N for level k.

    Between levels alpha and sigma are interpolated linearly: exact at every level in any dtype,
    alpha = 1 and sigma = 0 at t = 0, and well defined when the last level has alpha = 0. In between,
    alpha^2 + sigma^2 departs from 1 by at most 2e-4 (in the first interval, scaled_linear).

    The network's time input (`time_input`): `unit` passes t itself (the network scales it, by
    model.time_scale = 1000 to k + 1); `level` passes the level k = t * N - 1, exactly an integer at
    level times, which networks trained with DDPM's integer steps (DiT, Stable Diffusion) expect: pair
    it with model.time_scale=1. It is computed in float64 and returned in at least float32.
    """

    default_time_sampler = "discrete"

    def __init__(
        self,
        beta_schedule: str = "linear",
        num_timesteps: int = 1000,
        zero_terminal_snr: bool = False,
        time_sampler=None,
        loss_weight=None,
        loss_weighting: str | None = None,
        min_snr_gamma: float | None = None,
        time_input: str = "unit",
    ):
        if time_input not in TIME_INPUTS:
            raise ValueError(f"schedule.time_input must be one of {', '.join(TIME_INPUTS)}, got {time_input!r}")
        self.time_input = time_input
        self.beta_schedule = beta_schedule
        self.num_timesteps = num_timesteps
        self.zero_terminal_snr = zero_terminal_snr
        self.alphas_cumprod = alphas_cumprod(beta_schedule, num_timesteps, zero_terminal_snr)
        # Tables over t = 0, 1/N, ..., 1, the t = 0 entry being clean data.
        self._alpha = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod.sqrt()])
        self._sigma = torch.cat([torch.zeros(1, dtype=torch.float64), (1 - self.alphas_cumprod).sqrt()])
        if loss_weighting is not None or min_snr_gamma is not None:
            loss_weight = from_old_spelling(loss_weighting, min_snr_gamma, loss_weight)
        super().__init__(time_sampler, loss_weight)

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        position = t.clamp(0, 1) * self.num_timesteps
        lower = position.floor().long().clamp(max=self.num_timesteps - 1)
        frac = position - lower
        table = dict(device=t.device, dtype=t.dtype)
        alpha, sigma = self._alpha.to(**table), self._sigma.to(**table)
        return (
            torch.lerp(alpha[lower], alpha[lower + 1], frac),
            torch.lerp(sigma[lower], sigma[lower + 1], frac),
        )

    def model_input(self, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        if self.time_input == "unit":
            return x_t, t
        level = t.double() * self.num_timesteps - 1
        nearest = level.round()
        level = torch.where((level - nearest).abs() <= LEVEL_SNAP, nearest, level)
        # bf16 cannot hold the levels above 256 exactly
        return x_t, level.to(torch.promote_types(t.dtype, torch.float32))

    def timesteps(self, n: int) -> Tensor:
        """n evenly spaced levels, the noisiest (k = N - 1, t = 1) included, then 0."""
        if not 1 <= n <= self.num_timesteps:
            raise ValueError(f"timesteps needs 1 <= n <= num_timesteps={self.num_timesteps}, got {n}")
        levels = torch.round(torch.linspace(self.num_timesteps, 0, n + 1, dtype=torch.float64))
        return levels / self.num_timesteps
