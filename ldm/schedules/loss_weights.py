"""Loss weights: `loss_weight(t, parameterization) -> w` (B,), the weight of the squared error in target space.

Each is a small part any parameterization takes (config group `schedule/loss_weight`). The
published ones are stated on the x0 error; an error e in the target moves x0_hat by
-sigma / det * e (det = alpha*d - sigma*c of the two rows), so an x0-space weight W0 becomes
W0 * sigma^2 / det^2 in target space. Written that way, one formula is right for every target.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

Tensor = torch.Tensor


def rows(parameterization, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(alpha, sigma, det) of the two rows at t."""
    alpha, sigma = parameterization.alpha_sigma(t)
    c, d = parameterization.model_row(t)
    return alpha, sigma, alpha * d - sigma * c


def min_snr_weight(alpha: Tensor, sigma: Tensor, c: Tensor, d: Tensor, gamma: float) -> Tensor:
    """Min-SNR-gamma (Hang et al. 2023) expressed in the target space of the model row (c, d).

    Min-SNR weights the x0 error by min(SNR, gamma), so the target-space weight is
    min(SNR, gamma) * sigma^2 / det^2 = min(alpha^2, gamma * sigma^2) / det^2.
    That is min(SNR, g)/SNR for noise, min(SNR, g)/(SNR + 1) for v, and min(SNR, g) for x0.
    """
    det = alpha * d - sigma * c
    return torch.minimum(alpha**2, gamma * sigma**2) / det**2


@dataclass
class NoWeight:
    """1: the plain squared error of the parameterization's own target."""

    def __call__(self, t: Tensor, parameterization) -> Tensor:
        return torch.ones_like(t)


@dataclass
class MinSNRWeight:
    """Min-SNR-gamma (Hang et al. 2023): the x0 error weighted by min(SNR, gamma)."""

    gamma: float = 5.0

    def __post_init__(self):
        if self.gamma <= 0:
            raise ValueError(f"schedule.loss_weight.gamma must be positive, got {self.gamma}")

    def __call__(self, t: Tensor, parameterization) -> Tensor:
        alpha, sigma = parameterization.alpha_sigma(t)
        return min_snr_weight(alpha, sigma, *parameterization.model_row(t), self.gamma)


@dataclass
class EDMWeight:
    """EDM's lambda(s) = (s^2 + sd^2) / (s sd)^2 on the x0 error, at EDM's noise level s = sigma / alpha.

    In target space that is (sigma^2 + sd^2 alpha^2) / (sd^2 det^2), finite at both ends; on EDM's own
    F-target it is exactly 1. sd is `sigma_data`, by default the parameterization's `data_std`.
    """

    sigma_data: float | None = None

    def __call__(self, t: Tensor, parameterization) -> Tensor:
        sd = parameterization.data_std if self.sigma_data is None else self.sigma_data
        alpha, sigma, det = rows(parameterization, t)
        return (sigma**2 + sd**2 * alpha**2) / (sd**2 * det**2)


@dataclass
class SD3Weight:
    """SD3's rectified-flow loss (Esser et al. 2024: w_t = t / (1 - t), used with logit-normal times).

    It is the unweighted velocity error of the straight path through the same point: x_t / (alpha +
    sigma) is that path at t' = sigma / (alpha + sigma), whose velocity error is the x0 error times
    (alpha + sigma) / sigma. In target space: (alpha + sigma)^2 / det^2 (1 for `flow`).
    """

    def __call__(self, t: Tensor, parameterization) -> Tensor:
        alpha, sigma, det = rows(parameterization, t)
        return (alpha + sigma) ** 2 / det**2


# The names a config may give instead of a node with `_target_` (`schedule.loss_weight=min_snr`).
LOSS_WEIGHTS = {
    "none": NoWeight,
    "min_snr": MinSNRWeight,
    "edm": EDMWeight,
    "sd3": SD3Weight,
}

