"""Where guidance acts: an interval of noise levels sigma = sigma(t) / alpha(t) (Kynkäänniemi et al. 2024), or of t.

The noise level sigma / alpha is the same quantity for every parameterization (x_t / alpha = x0 + sigma/alpha *
noise), which is why the published intervals are given in it; EDM's sigma and flow's t / (1 - t) are instances.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

Tensor = torch.Tensor


def noise_level(schedule, t: Tensor) -> Tensor:
    """sigma(t) / alpha(t), infinite where alpha = 0 (flow's t = 1)."""
    alpha, sigma = schedule.alpha_sigma(t)
    return sigma / alpha  # sigma > 0 wherever alpha = 0: +inf, never NaN


@dataclass(frozen=True)
class NoiseInterval:
    """Guide where low < sigma / alpha <= high (as in the paper), or, with `in_t`, where low <= t <= high."""

    low: float
    high: float
    in_t: bool = False

    def __post_init__(self):
        if not self.low < self.high:
            unit = "t" if self.in_t else "sigma"
            raise ValueError(f"guidance interval must be [{unit}_lo, {unit}_hi] with {unit}_lo < {unit}_hi, "
                             f"got {[self.low, self.high]}")

    def inside(self, schedule, t: Tensor) -> Tensor:
        """(B,) bool: which samples of the batch are guided at times t (B,)."""
        if self.in_t:
            return (t >= self.low) & (t <= self.high)
        level = noise_level(schedule, t)
        return (level > self.low) & (level <= self.high)

    def record(self) -> dict:
        return {"guidance_interval": [self.low, self.high], "guidance_interval_in": "t" if self.in_t else "sigma"}
