"""Heun: the trapezoidal rule on the data-prediction ODE, in the variables (x / sigma, alpha / sigma).

In those variables the ODE is d(x/sigma) = x0_hat d(alpha/sigma), finite even where alpha = 0, and
Euler in them is the first-order update. Heun averages x0_hat at both ends. The last step (to
sigma = 0) stays first order, as in EDM's sampler.
"""

from ldm.samplers.base import Sampler, intervals, step_with_x0


class Heun(Sampler):
    def calls(self, steps: int) -> int:
        return 2 * steps - 1

    def sample(self, model_fn, x, p, times, generator):
        for t, t_next in intervals(times, x):
            pred = model_fn(x, t)
            if (t_next == 0).all():
                x = p.step(x, pred, t, t_next)
                continue
            x0, _ = p.to_x0_noise(x, pred, t)
            x_euler = step_with_x0(p, x, x0, t, t_next)
            x0_next, _ = p.to_x0_noise(x_euler, model_fn(x_euler, t_next), t_next)
            x = step_with_x0(p, x, (x0 + x0_next) / 2, t, t_next)
        return x
