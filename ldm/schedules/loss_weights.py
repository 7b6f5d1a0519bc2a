"""Loss weightings that follow from the two rows, so one formula is right for every target."""

from __future__ import annotations

import torch

Tensor = torch.Tensor

LOSS_WEIGHTINGS = ("none", "min_snr")


def min_snr_weight(alpha: Tensor, sigma: Tensor, c: Tensor, d: Tensor, gamma: float) -> Tensor:
    """Min-SNR-gamma (Hang et al. 2023) expressed in the target space of the model row (c, d).

    Min-SNR weights the x0 error by min(SNR, gamma). An error e in the target moves x0_hat by
    -sigma / det * e (det = alpha*d - sigma*c), so the target-space weight is
    min(SNR, gamma) * sigma^2 / det^2 = min(alpha^2, gamma * sigma^2) / det^2.
    That is min(SNR, g)/SNR for noise, min(SNR, g)/(SNR + 1) for v, and min(SNR, g) for x0.
    """
    det = alpha * d - sigma * c
    return torch.minimum(alpha**2, gamma * sigma**2) / det**2


def check_loss_weighting(name: str | None) -> str:
    name = "none" if name is None else name
    if name not in LOSS_WEIGHTINGS:
        raise ValueError(f"loss_weighting must be one of {', '.join(LOSS_WEIGHTINGS)}; got {name!r}")
    return name
