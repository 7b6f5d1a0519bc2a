"""EDM (Karras et al. 2022): alpha = 1, sigma(t), with the paper's preconditioning.

Time is mapped to noise by sigma(t) = sigma_max * t**rho. It is monotone, gives sigma(0) = 0
exactly, and makes Karras' rho-spaced grid uniform in t: the level sigma_min sits at
t_min = (sigma_min / sigma_max)**(1 / rho).
"""

from __future__ import annotations

import torch

from ldm.schedules.base import Parameterization, expand_as
from ldm.schedules.time_samplers import normal

Tensor = torch.Tensor


class EDM(Parameterization):
    """The network F is trained on (x0 - c_skip x_t) / c_out, a linear row in (x0, noise)."""

    def __init__(
        self,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        rho: float = 7.0,
        sigma_data: float = 0.5,
        p_mean: float = -1.2,
        p_std: float = 1.2,
    ):
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"EDM needs 0 < sigma_min < sigma_max, got {sigma_min} and {sigma_max}")
        self.sigma_min, self.sigma_max, self.rho = sigma_min, sigma_max, rho
        self.sigma_data, self.p_mean, self.p_std = sigma_data, p_mean, p_std

    def sigma(self, t: Tensor) -> Tensor:
        return self.sigma_max * t**self.rho

    def t_of_sigma(self, sigma: Tensor) -> Tensor:
        return (sigma / self.sigma_max) ** (1 / self.rho)

    def preconditioning(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(c_skip, c_out, c_in, c_noise) of the paper's Table 1."""
        sd2 = self.sigma_data**2
        norm = (sigma**2 + sd2).sqrt()
        return sd2 / norm**2, sigma * self.sigma_data / norm, 1 / norm, sigma.log() / 4

    def alpha_sigma(self, t):
        return torch.ones_like(t), self.sigma(t)

    def model_row(self, t):
        # (x0 - c_skip (x0 + sigma n)) / c_out, simplified so it stays finite at sigma = 0.
        sigma = self.sigma(t)
        norm = (sigma**2 + self.sigma_data**2).sqrt()
        return sigma / (self.sigma_data * norm), -self.sigma_data / norm

    def model_input(self, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        _, _, c_in, c_noise = self.preconditioning(self.sigma(t))
        return expand_as(c_in, x_t) * x_t, c_noise

    def timesteps(self, n: int) -> Tensor:
        """Karras' n levels sigma_max -> sigma_min (uniform in t here), then 0."""
        if n < 1:
            raise ValueError(f"timesteps needs n >= 1 steps, got {n}")
        t_min = (self.sigma_min / self.sigma_max) ** (1 / self.rho)
        levels = torch.linspace(1, t_min, n, dtype=torch.float64)
        return torch.cat([levels, levels.new_zeros(1)])

    def sample_t(self, batch_size: int, generator: torch.Generator | None = None) -> Tensor:
        log_sigma = self.p_mean + self.p_std * normal(batch_size, generator)
        # t is capped at 1 (sigma_max); a draw above that has probability ~1e-6 with the defaults.
        return self.t_of_sigma(log_sigma.exp()).clamp(max=1)

    def loss_weight(self, t: Tensor) -> Tensor:
        """lambda(sigma) * c_out**2 = 1: the F-space error already carries EDM's weighting."""
        return torch.ones_like(t)
