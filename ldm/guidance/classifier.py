"""Classifier guidance (Dhariwal & Nichol 2021) in any parameterization: a shift of the score by
scale * grad log p(y | x_t), carried into the target space through the schedule's two rows.

With x_t = alpha x0 + sigma noise the score is -noise_hat / sigma, so adding `scale * g` to it is ADM's
noise_hat' = noise_hat - scale * sigma * g; the data estimate moves with it so that alpha x0' + sigma noise' is
still x_t: x0' = x0_hat + scale * sigma^2 / alpha * g. The new pair is written back as a prediction with
`schedule.target`. Where alpha = 0 (flow's t = 1) x_t holds nothing of y, the exact gradient is 0 and the
data estimate cannot be moved by a score: the prediction is left as it is there, and wherever alpha / sigma is
below `MIN_SIGNAL` (noise levels above 1000, the first instants of schedules that start at pure noise), where
sigma^2 / alpha would blow up a learned classifier's small but non-zero gradient.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ldm.schedules.base import expand_as

Tensor = torch.Tensor
# log_likelihood(x_t, t) -> (B,): log p(y_i | x_t[i]) for the labels asked
LogLikelihood = Callable[[Tensor, Tensor], Tensor]
MIN_SIGNAL = 1e-3


def log_likelihood_gradient(log_likelihood: LogLikelihood, x: Tensor, t: Tensor) -> Tensor:
    """grad_x log p(y | x_t) per sample, also inside no_grad / inference mode (samplers, Lightning's loops)."""
    with torch.inference_mode(False), torch.enable_grad():
        x, t = x.detach().clone().requires_grad_(True), t.detach().clone()
        (gradient,) = torch.autograd.grad(log_likelihood(x, t).sum(), x)
    return gradient.to(x.dtype)


def shift_by_gradient(schedule, x: Tensor, pred: Tensor, t: Tensor, gradient: Tensor, scale: float) -> Tensor:
    """The prediction whose score is the given one's plus scale * gradient (same x_t, t; any parameterization)."""
    x0, noise = schedule.to_x0_noise(x, pred, t)
    alpha, sigma = schedule.alpha_sigma(t)
    alpha, sigma = expand_as(alpha, x), expand_as(sigma, x)
    informative = alpha > MIN_SIGNAL * sigma
    gradient = torch.where(informative, gradient, torch.zeros_like(gradient))
    noise = noise - scale * sigma * gradient
    x0 = x0 + scale * sigma**2 / torch.where(informative, alpha, torch.ones_like(alpha)) * gradient
    return schedule.target(x0, noise, t)


def classifier_shift(schedule, log_likelihood: LogLikelihood, scale: float):
    """shift(x_t, pred, t) for `guided_model_fn`: ADM's classifier guidance with scale `scale`."""

    def shift(x: Tensor, pred: Tensor, t: Tensor) -> Tensor:
        return shift_by_gradient(schedule, x, pred, t, log_likelihood_gradient(log_likelihood, x, t), scale)

    return shift
