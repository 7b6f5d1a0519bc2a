"""The `Parameterization` base: a data row and a model row, and everything derived from them.

data row:  x_t    = alpha(t) * x0 + sigma(t) * noise
model row: target = c(t)     * x0 + d(t)     * noise

Stacking the rows gives M_t = [[alpha, sigma], [c, d]]; solving it turns a prediction back into
(x0_hat, noise_hat), and the first-order update re-noises that pair at the next time. How training
times are drawn and how the loss is weighted are parts passed in (`time_samplers`, `loss_weights`).
"""

from __future__ import annotations

import torch

from ldm.schedules.loss_weights import LOSS_WEIGHTS
from ldm.schedules.time_samplers import TIME_SAMPLERS

Tensor = torch.Tensor

# Times on which construction checks that the two rows are invertible. t = 0 is left out: no step
# starts there, and some targets (x0) cannot recover the noise from noiseless data.
CHECK_GRID_SIZE = 1000
# Halvings of [0, 1] in `t_of_noise_level`: 2^-60 is below float64's resolution near 1.
BISECTION_STEPS = 60


def expand_as(coef: Tensor, x: Tensor) -> Tensor:
    """Reshape per-sample coefficients (B,) to broadcast against x (B, ...), in x's dtype."""
    return coef.to(x.dtype).reshape(coef.shape + (1,) * (x.ndim - coef.ndim))


def resolve_part(value, options: dict, key: str):
    """A part given by name (`min_snr`) becomes that part with its defaults; an object is kept as it is."""
    if not isinstance(value, str):
        return value
    if value not in options:
        raise ValueError(f"{key} must be one of {', '.join(options)} (or a node with _target_); got {value!r}")
    return options[value]()


def old_keys(**values) -> str:
    """`schedule.key=value` for the old config keys that were given, for errors that name them."""
    return " / ".join(f"schedule.{key}={value!r}" for key, value in values.items() if value is not None)


class Parameterization:
    """A diffusion method as two coefficient rows; subclasses state `alpha_sigma` and `model_row`.

    A subclass with its own constructor sets its fields first and calls `super().__init__(...)`
    last, because the base constructor ends by checking the rows, which read those fields.
    """

    data_std: float = 1.0  # the std this method assumes for x0; latents are scaled to it
    default_time_sampler: str = "uniform"
    default_loss_weight: str = "none"

    def __init__(self, time_sampler=None, loss_weight=None):
        time_sampler = self.default_time_sampler if time_sampler is None else time_sampler
        loss_weight = self.default_loss_weight if loss_weight is None else loss_weight
        self.time_sampler = resolve_part(time_sampler, TIME_SAMPLERS, "schedule.time_sampler")
        self.weighting = resolve_part(loss_weight, LOSS_WEIGHTS, "schedule.loss_weight")
        for part in (self.time_sampler, self.weighting):
            if hasattr(part, "check"):  # a part that cannot serve this method says so at build time
                part.check(self)
        # The one place the rows are checked: every constructor ends here.
        self.check_invertible()

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
        """First-order update (DDIM / Euler) from a prediction in target space."""
        return self.step_with_x0(x_t, self.to_x0_noise(x_t, pred, t)[0], t, t_next)

    def step_with_x0(self, x_t: Tensor, x0: Tensor, t: Tensor, t_next: Tensor) -> Tensor:
        """x_next = alpha' x0 + sigma' (x_t - alpha x0) / sigma: the first-order update from a data estimate.

        With the model's own x0_hat it is `step`; higher-order samplers pass a combined estimate. For
        alpha = 1 it is the Euler step in sigma, in general the exact solution of the ODE for a
        constant data prediction.
        """
        alpha, sigma = self.alpha_sigma(t)
        alpha_next, sigma_next = self.alpha_sigma(t_next)
        noise = (x_t - expand_as(alpha, x_t) * x0) / expand_as(sigma, x_t)
        return expand_as(alpha_next, x_t) * x0 + expand_as(sigma_next, x_t) * noise

    def t_of_noise_level(self, level: Tensor) -> Tensor:
        """The t where sigma / alpha = level (EDM's sigma), by bisection; 1 past the noisiest level."""
        lo, hi = torch.zeros_like(level, dtype=torch.float64), torch.ones_like(level, dtype=torch.float64)
        target = level.to(torch.float64)
        for _ in range(BISECTION_STEPS):
            mid = (lo + hi) / 2
            alpha, sigma = self.alpha_sigma(mid)
            below = sigma < target * alpha  # sigma / alpha < level, without dividing by alpha = 0
            lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
        return hi.to(level.dtype)

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
        fields = {k: v for k, v in vars(self).items() if not k.startswith("_") and not torch.is_tensor(v)}
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in fields.items())})"

    # ---- defaults a method file may override ----------------------------------------------------

    def timesteps(self, n: int) -> Tensor:
        """n + 1 inference times from 1 down to exactly 0 (float64, CPU; cast with `.to(x)`)."""
        if n < 1:
            raise ValueError(f"timesteps needs n >= 1 steps, got {n}")
        return torch.linspace(1, 0, n + 1, dtype=torch.float64)

    def sample_t(self, batch_size: int, generator: torch.Generator | None = None) -> Tensor:
        """Training times (B,) from the time sampler; reproducible with a seeded generator."""
        return self.time_sampler(batch_size, self, generator)

    def loss_weight(self, t: Tensor) -> Tensor:
        """Per-sample weight (B,) of the squared error in target space, from the loss-weight part."""
        return self.weighting(t, self)

    def model_input(self, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """What the network sees: (x_in, t_in)."""
        return x_t, t
