"""Training-time samplers: `time_sampler(batch_size, parameterization, generator=None) -> t` (B,).

Each is a small part any parameterization takes (config group `schedule/time_sampler`). Times are
in [0, 1] and on the generator's device (the CPU without one). Some need the parameterization:
`discrete` reads its number of levels, `lognormal` maps a noise level to t through it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ldm.utils.noise import generator_device, rand, randn

Tensor = torch.Tensor


@dataclass
class Uniform:
    """t ~ U(0, 1)."""

    def __call__(self, batch_size: int, parameterization, generator: torch.Generator | None = None) -> Tensor:
        return rand(batch_size, generator)


@dataclass
class LogitNormal:
    """t = sigmoid(N(mean, std^2)): more training at middle times (SD3's rf/lognorm(0, 1))."""

    mean: float = 0.0
    std: float = 1.0

    def __post_init__(self):
        if self.std <= 0:
            raise ValueError(f"schedule.time_sampler.std must be positive, got {self.std}")

    def __call__(self, batch_size: int, parameterization, generator: torch.Generator | None = None) -> Tensor:
        return torch.sigmoid(self.mean + self.std * randn(batch_size, generator))


@dataclass
class Mode:
    """SD3's mode sampling with heavy tails (Esser et al. 2024, eq. 20): t = 1 - u - s (cos^2(pi u / 2) - 1 + u).

    u ~ U(0, 1); s > 0 moves mass to the middle, s < 0 to the ends. The map is a monotone bijection
    of [0, 1] only for -1 <= s <= 2 / (pi - 2); 1.29 is SD3's best setting.
    """

    scale: float = 1.29

    def __post_init__(self):
        if not -1 <= self.scale <= 2 / (math.pi - 2):
            raise ValueError(f"schedule.time_sampler.scale must be in [-1, 2 / (pi - 2) = 1.752], got {self.scale}")

    def __call__(self, batch_size: int, parameterization, generator: torch.Generator | None = None) -> Tensor:
        u = rand(batch_size, generator)
        return 1 - u - self.scale * (torch.cos(math.pi / 2 * u) ** 2 - 1 + u)


@dataclass
class Discrete:
    """Uniform over the levels t = (k + 1) / N, k = 0 .. N - 1; N defaults to the parameterization's own."""

    num_timesteps: int | None = None

    def levels(self, parameterization) -> int:
        n = self.num_timesteps or getattr(parameterization, "num_timesteps", None)
        if not n:
            raise ValueError(
                f"schedule.time_sampler=discrete needs a number of levels: {type(parameterization).__name__} has "
                "no num_timesteps, so set schedule.time_sampler.num_timesteps (e.g. 1000)"
            )
        return n

    def check(self, parameterization) -> None:
        self.levels(parameterization)

    def __call__(self, batch_size: int, parameterization, generator: torch.Generator | None = None) -> Tensor:
        n = self.levels(parameterization)
        k = torch.randint(0, n, (batch_size,), generator=generator, device=generator_device(generator))
        return (k + 1).float() / n


@dataclass
class LogNormal:
    """EDM's training noise (Karras et al. 2022): ln(sigma / alpha) ~ N(p_mean, p_std^2), mapped to t.

    sigma / alpha is EDM's sigma for any data row (x_t / alpha = x0 + (sigma / alpha) noise); the
    parameterization's `t_of_noise_level` turns it into t, capped at its noisiest level t = 1.
    """

    p_mean: float = -1.2
    p_std: float = 1.2

    def __post_init__(self):
        if self.p_std <= 0:
            raise ValueError(f"schedule.time_sampler.p_std must be positive, got {self.p_std}")

    def __call__(self, batch_size: int, parameterization, generator: torch.Generator | None = None) -> Tensor:
        level = (self.p_mean + self.p_std * randn(batch_size, generator)).exp()
        return parameterization.t_of_noise_level(level)


# The names a config may give instead of a node with `_target_` (`schedule.time_sampler=mode`).
TIME_SAMPLERS = {
    "uniform": Uniform,
    "logit_normal": LogitNormal,
    "mode": Mode,
    "discrete": Discrete,
    "lognormal": LogNormal,
}
