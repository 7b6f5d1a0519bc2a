"""Ancestral sampling from the posterior q(x_s | x_t, x0 = x0_hat), s < t, for any alpha and sigma.

With r = (alpha_t sigma_s) / (alpha_s sigma_t) = sqrt(SNR_t / SNR_s) <= 1, the posterior is
mean = r (sigma_s / sigma_t) x_t + alpha_s (1 - r^2) x0,  variance = sigma_s^2 (1 - r^2),
which for VP is DDPM's posterior with variance beta-tilde.
"""

from ldm.samplers.base import Sampler, intervals, randn_like
from ldm.schedules.base import expand_as


def posterior(p, t, t_next):
    """Coefficients on x_t and x0, and the std, of q(x_{t_next} | x_t, x0)."""
    alpha, sigma = p.alpha_sigma(t)
    alpha_next, sigma_next = p.alpha_sigma(t_next)
    r = (alpha * sigma_next / (alpha_next * sigma)).clamp(max=1)
    coef_x = r * sigma_next / sigma
    coef_x0 = alpha_next * (1 - r**2)
    std = sigma_next * (1 - r**2).sqrt()
    return coef_x, coef_x0, std


class DDPMSampler(Sampler):
    stochastic = True

    def sample(self, model_fn, x, p, times, generator):
        for t, t_next in intervals(times, x):
            x0, _ = p.to_x0_noise(x, model_fn(x, t), t)
            coef_x, coef_x0, std = posterior(p, t, t_next)
            z = randn_like(x, generator)
            x = expand_as(coef_x, x) * x + expand_as(coef_x0, x) * x0 + expand_as(std, x) * z
        return x
