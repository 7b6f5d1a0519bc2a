"""Unit Gaussian noise drawn where its generator lives, so a CPU generator seeds CUDA tensors too."""

from __future__ import annotations

import numpy as np
import torch

Tensor = torch.Tensor


def generator_device(generator: torch.Generator | None, device: torch.device | str | None = None) -> torch.device:
    """The device random numbers must be drawn on: the generator's, else `device`, else the CPU."""
    if generator is not None:
        return generator.device
    return torch.device(device) if device is not None else torch.device("cpu")


def randn(
    shape,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Unit noise of `shape`, drawn on the generator's device (same draws whatever `device`), returned on `device`."""
    noise = torch.randn(shape, generator=generator, device=generator_device(generator, device), dtype=dtype)
    return noise if device is None else noise.to(device)


def rand(size: int, generator: torch.Generator | None = None, device: torch.device | str | None = None) -> Tensor:
    """U(0, 1) draws (size,), drawn on the generator's device and returned on `device`."""
    draws = torch.rand(size, generator=generator, device=generator_device(generator, device))
    return draws if device is None else draws.to(device)


def step_seed(*keys: int) -> int:
    """A well-mixed 63-bit seed from integers (run seed, rank, step, batch index)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(2, np.uint64)[0] >> np.uint64(1))
