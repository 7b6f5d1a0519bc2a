"""Euler: the first-order update of the two rows (DDIM with eta = 0 on VP)."""

from ldm.samplers.base import Sampler, intervals, report


class Euler(Sampler):
    def sample(self, model_fn, x, parameterization, times, generator, callback):
        for i, t, t_next in intervals(times, x):
            x0, _ = parameterization.to_x0_noise(x, model_fn(x, t), t)
            report(callback, i, t, x, x0)
            x = parameterization.step_with_x0(x, x0, t, t_next)
        return x
