"""Training-time samplers: each returns (B,) times in [0, 1] on the generator's device."""

from __future__ import annotations

import torch

Tensor = torch.Tensor


def _device(generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


def uniform_t(batch_size: int, generator: torch.Generator | None = None) -> Tensor:
    return torch.rand(batch_size, generator=generator, device=_device(generator))


def logit_normal_t(
    batch_size: int, mean: float = 0.0, std: float = 1.0, generator: torch.Generator | None = None
) -> Tensor:
    """sigmoid(N(mean, std^2)): concentrates training on middle times (SD3)."""
    z = torch.randn(batch_size, generator=generator, device=_device(generator))
    return torch.sigmoid(mean + std * z)


def discrete_t(batch_size: int, num_timesteps: int, generator: torch.Generator | None = None) -> Tensor:
    """Uniform over the levels t = (k + 1) / N of a discrete schedule."""
    k = torch.randint(0, num_timesteps, (batch_size,), generator=generator, device=_device(generator))
    return (k + 1).float() / num_timesteps


def normal(batch_size: int, generator: torch.Generator | None = None) -> Tensor:
    """Standard normal draws (for samplers defined in another variable, e.g. EDM's log sigma)."""
    return torch.randn(batch_size, generator=generator, device=_device(generator))
