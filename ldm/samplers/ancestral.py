"""Ancestral sampling from the posterior q(x_s | x_t, x0 = x0_hat), s < t, for any alpha and sigma.

With r = (alpha_t sigma_s) / (alpha_s sigma_t) = sqrt(SNR_t / SNR_s) <= 1, the posterior is
mean = r (sigma_s / sigma_t) x_t + alpha_s (1 - r^2) x0,  variance = sigma_s^2 (1 - r^2),
which for VP is DDPM's posterior with variance beta-tilde (hence the old name `ddpm`).
"""

from ldm.samplers.base import Sampler, intervals, report
from ldm.schedules.base import expand_as
from ldm.utils.noise import randn


def posterior(parameterization, t, t_next):
    """Coefficients on x_t and x0, and the std, of q(x_{t_next} | x_t, x0)."""
    alpha, sigma = parameterization.alpha_sigma(t)
    alpha_next, sigma_next = parameterization.alpha_sigma(t_next)
    r = (alpha * sigma_next / (alpha_next * sigma)).clamp(max=1)
    coef_x = r * sigma_next / sigma
    coef_x0 = alpha_next * (1 - r**2)
    std = sigma_next * (1 - r**2).sqrt()
    return coef_x, coef_x0, std


class Ancestral(Sampler):
    stochastic = True

    def sample(self, model_fn, x, parameterization, times, generator, callback):
        for i, t, t_next in intervals(times, x):
            x0, _ = parameterization.to_x0_noise(x, model_fn(x, t), t)
            report(callback, i, t, x, x0)
            coef_x, coef_x0, std = posterior(parameterization, t, t_next)
            z = randn(x.shape, generator, device=x.device, dtype=x.dtype)
            x = expand_as(coef_x, x) * x + expand_as(coef_x0, x) * x0 + expand_as(std, x) * z
        return x
