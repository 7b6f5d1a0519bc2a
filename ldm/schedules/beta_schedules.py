"""Discrete VP noise schedules: betas, and the zero-terminal-SNR rescaling of Lin et al. (2023)."""

from __future__ import annotations

import math

import torch

Tensor = torch.Tensor

BETA_SCHEDULES = ("linear", "scaled_linear", "cosine")


def make_betas(name: str, num_timesteps: int = 1000) -> Tensor:
    """Betas (N,) in float64 for one of BETA_SCHEDULES."""
    n = num_timesteps
    if name == "linear":  # DDPM (Ho et al. 2020)
        return torch.linspace(1e-4, 0.02, n, dtype=torch.float64)
    if name == "scaled_linear":  # Stable Diffusion: linear in sqrt(beta)
        return torch.linspace(0.00085**0.5, 0.012**0.5, n, dtype=torch.float64) ** 2
    if name == "cosine":  # improved DDPM (Nichol & Dhariwal 2021), betas capped at 0.999
        s = torch.arange(n + 1, dtype=torch.float64) / n
        alpha_bar = torch.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
        return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=0.999)
    raise ValueError(f"beta_schedule must be one of {', '.join(BETA_SCHEDULES)}; got {name!r}")


def rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Shift and scale sqrt(alphas_cumprod) so the last level has alpha = 0 and the first is unchanged."""
    alpha_bar_sqrt = torch.cumprod(1 - betas, 0).sqrt()
    first, last = alpha_bar_sqrt[0].clone(), alpha_bar_sqrt[-1].clone()
    alpha_bar_sqrt = (alpha_bar_sqrt - last) * first / (first - last)
    alpha_bar = alpha_bar_sqrt**2
    alphas = torch.cat([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
    return 1 - alphas


def alphas_cumprod(name: str, num_timesteps: int = 1000, zero_terminal_snr: bool = False) -> Tensor:
    """alphas_cumprod (N,) in float64, indexed like diffusers (k = 0 is the least noisy level)."""
    betas = make_betas(name, num_timesteps)
    if zero_terminal_snr:
        betas = rescale_zero_terminal_snr(betas)
    return torch.cumprod(1 - betas, 0)
