"""EDM (Karras et al. 2022): alpha = 1, sigma(t), with the paper's preconditioning.

Time is mapped to noise by sigma(t) = sigma_max * t**rho. It is monotone, gives sigma(0) = 0
exactly, and makes Karras' rho-spaced grid uniform in t: the level sigma_min sits at
t_min = (sigma_min / sigma_max)**(1 / rho).
"""

from __future__ import annotations

import torch

from ldm.schedules.base import Parameterization, expand_as, old_keys
from ldm.schedules.time_samplers import LogNormal

Tensor = torch.Tensor


class EDM(Parameterization):
    """The network F is trained on (x0 - c_skip x_t) / c_out, a linear row in (x0, noise).

    Training times default to EDM's log-normal noise levels; the loss weight to none, since the
    F-space error already carries EDM's lambda(sigma) (the `edm` loss weight is exactly 1 here).
    """

    default_time_sampler = "lognormal"

    def __init__(
        self,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        rho: float = 7.0,
        sigma_data: float = 0.5,
        time_sampler=None,
        loss_weight=None,
        p_mean: float | None = None,
        p_std: float | None = None,
    ):
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"EDM needs 0 < sigma_min < sigma_max, got {sigma_min} and {sigma_max}")
        if sigma_data <= 0:
            raise ValueError(f"schedule.sigma_data must be positive, got {sigma_data}")
        self.sigma_min, self.sigma_max, self.rho, self.sigma_data = sigma_min, sigma_max, rho, sigma_data
        if p_mean is not None or p_std is not None:  # the spelling of configs before time samplers were parts
            if time_sampler is not None:
                raise ValueError(
                    f"{old_keys(p_mean=p_mean, p_std=p_std)}: old spelling; write "
                    "schedule.time_sampler.p_mean=... schedule.time_sampler.p_std=... (time_sampler=lognormal)"
                )
            time_sampler = LogNormal(-1.2 if p_mean is None else p_mean, 1.2 if p_std is None else p_std)
        super().__init__(time_sampler, loss_weight)

    @property
    def data_std(self) -> float:
        """EDM's preconditioning assumes x0 with std sigma_data."""
        return self.sigma_data

    def sigma(self, t: Tensor) -> Tensor:
        return self.sigma_max * t**self.rho

    def t_of_sigma(self, sigma: Tensor) -> Tensor:
        return (sigma / self.sigma_max) ** (1 / self.rho)

    def t_of_noise_level(self, level: Tensor) -> Tensor:
        # alpha = 1, so the noise level is sigma; capped at 1 (sigma_max), a draw above that having
        # probability ~1e-6 with EDM's training distribution.
        return self.t_of_sigma(level).clamp(max=1)

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
