"""Euler ancestral: the first-order update with a fraction eta of the posterior noise re-drawn.

x_s = alpha_s x0_hat + sqrt(sigma_s^2 - c^2) noise_hat + c z, c = eta * posterior std of
q(x_s | x_t, x0). eta = 0 is Euler (DDIM); eta = 1 samples the same posterior as `ancestral`.
"""

from ldm.samplers.ancestral import posterior
from ldm.samplers.base import Sampler, intervals, report
from ldm.schedules.base import expand_as
from ldm.utils.noise import randn


class EulerAncestral(Sampler):
    def __init__(self, eta: float = 1.0):
        if not 0 <= eta <= 1:
            raise ValueError(f"sampler.eta must be in [0, 1], got {eta}")
        self.eta = eta
        self.stochastic = eta > 0

    def sample(self, model_fn, x, parameterization, times, generator, callback):
        for i, t, t_next in intervals(times, x):
            x0, noise = parameterization.to_x0_noise(x, model_fn(x, t), t)
            report(callback, i, t, x, x0)
            alpha_next, sigma_next = parameterization.alpha_sigma(t_next)
            fresh = self.eta * posterior(parameterization, t, t_next)[2]
            kept = (sigma_next**2 - fresh**2).clamp(min=0).sqrt()
            z = randn(x.shape, generator, device=x.device, dtype=x.dtype)
            x = expand_as(alpha_next, x) * x0 + expand_as(kept, x) * noise + expand_as(fresh, x) * z
        return x
