"""The `Parameterization` base: a data row and a model row, and everything derived from them.

data row:  x_t    = alpha(t) * x0 + sigma(t) * noise
model row: target = c(t)     * x0 + d(t)     * noise

Stacking the rows gives M_t = [[alpha, sigma], [c, d]]; solving it turns a prediction back into
(x0_hat, noise_hat), and the first-order update re-noises that pair at the next time.
"""

from __future__ import annotations

import inspect

import torch

from ldm.schedules.time_samplers import uniform_t

Tensor = torch.Tensor

# Times on which construction checks that the two rows are invertible. t = 0 is left out: no step
# starts there, and some targets (x0) cannot recover the noise from noiseless data.
CHECK_GRID_SIZE = 1000


def expand_as(coef: Tensor, x: Tensor) -> Tensor:
    """Reshape per-sample coefficients (B,) to broadcast against x (B, ...), in x's dtype."""
    return coef.to(x.dtype).reshape(coef.shape + (1,) * (x.ndim - coef.ndim))


class _CheckedAfterInit(type):
    # Runs the invertibility check after the whole __init__ chain, so no method file has to call it.
    def __call__(cls, *args, **kwargs):
        obj = super().__call__(*args, **kwargs)
        obj.check_invertible()
        return obj


class Parameterization(metaclass=_CheckedAfterInit):
    """A diffusion method as two coefficient rows; subclasses state `alpha_sigma` and `model_row`."""

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """The data row: x_t = alpha * x0 + sigma * noise; t (B,) in [0, 1], returns two (B,)."""
        raise NotImplementedError

    def model_row(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """The model row: target = c * x0 + d * noise; returns (c, d), each (B,)."""
        raise NotImplementedError

    # ---- derived from the two rows -------------------------------------------------------------

    def target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        c, d = self.model_row(t)
        return expand_as(c, x0) * x0 + expand_as(d, x0) * noise

    def noised(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """x_t from the data row."""
        alpha, sigma = self.alpha_sigma(t)
        return expand_as(alpha, x0) * x0 + expand_as(sigma, x0) * noise

    def to_x0_noise(self, x_t: Tensor, pred: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Solve [[alpha, sigma], [c, d]] @ (x0, noise) = (x_t, pred) by Cramer's rule."""
        alpha, sigma = self.alpha_sigma(t)
        c, d = self.model_row(t)
        det = alpha * d - sigma * c
        x0 = expand_as(d / det, x_t) * x_t - expand_as(sigma / det, x_t) * pred
        noise = expand_as(alpha / det, x_t) * pred - expand_as(c / det, x_t) * x_t
        return x0, noise

    def step(self, x_t: Tensor, pred: Tensor, t: Tensor, t_next: Tensor) -> Tensor:
        """First-order update (DDIM / Euler): re-noise (x0_hat, noise_hat) at t_next."""
        x0, noise = self.to_x0_noise(x_t, pred, t)
        return self.noised(x0, noise, t_next)

    def check_invertible(self) -> None:
        """Raise ValueError if the two rows are singular anywhere on a grid of t in (0, 1]."""
        t = torch.linspace(0, 1, CHECK_GRID_SIZE + 1, dtype=torch.float64)[1:]
        alpha, sigma = self.alpha_sigma(t)
        c, d = self.model_row(t)
        det = alpha * d - sigma * c
        scale = (alpha.abs() + sigma.abs()) * (c.abs() + d.abs())
        bad = ~torch.isfinite(det) | (det.abs() <= 1e-9 * scale)
        if bad.any():
            t_bad = t[bad][-1].item()
            raise ValueError(
                f"{type(self).__name__}: the data row (alpha, sigma) and the model row (c, d) are not "
                f"invertible at t={t_bad:.4g} (det = alpha*d - sigma*c = {det[bad][-1].item():.3g}), so a "
                "prediction cannot be turned back into (x0, noise). Choose a target that is not a multiple "
                "of x_t there (e.g. v or x0 instead of noise when alpha(1) = 0)."
            )

    def __repr__(self) -> str:
        names = [n for n in inspect.signature(type(self).__init__).parameters if hasattr(self, n)]
        return f"{type(self).__name__}({', '.join(f'{n}={getattr(self, n)!r}' for n in names)})"

    # ---- defaults a method file may override ----------------------------------------------------

    def timesteps(self, n: int) -> Tensor:
        """n + 1 inference times from 1 down to exactly 0 (float64, CPU; cast with `.to(x)`)."""
        if n < 1:
            raise ValueError(f"timesteps needs n >= 1 steps, got {n}")
        return torch.linspace(1, 0, n + 1, dtype=torch.float64)

    def sample_t(self, batch_size: int, generator: torch.Generator | None = None) -> Tensor:
        """Training times (B,); reproducible with a seeded generator."""
        return uniform_t(batch_size, generator)

    def loss_weight(self, t: Tensor) -> Tensor:
        """Per-sample weight (B,) of the squared error in target space."""
        return torch.ones_like(t)

    def model_input(self, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """What the network sees: (x_in, t_in)."""
        return x_t, t
