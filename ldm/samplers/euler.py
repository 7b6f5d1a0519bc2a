"""Euler: the first-order update of the two rows (DDIM with eta = 0 on VP)."""

from ldm.samplers.base import Sampler, intervals


class Euler(Sampler):
    def sample(self, model_fn, x, p, times, generator):
        for t, t_next in intervals(times, x):
            x = p.step(x, model_fn(x, t), t, t_next)
        return x
