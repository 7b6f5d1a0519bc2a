"""Heun: the trapezoidal rule on the data-prediction ODE, in the variables (x / sigma, alpha / sigma).

In those variables the ODE is d(x/sigma) = x0_hat d(alpha/sigma), finite even where alpha = 0, and
Euler in them is the first-order update. Heun averages x0_hat at both ends. The last step (to
sigma = 0) stays first order, as in EDM's sampler.
"""

from ldm.samplers.base import Sampler, intervals, report


class Heun(Sampler):
    def calls(self, steps: int) -> int:
        return 2 * steps - 1

    def sample(self, model_fn, x, parameterization, times, generator, callback):
        for i, t, t_next in intervals(times, x):
            x0, _ = parameterization.to_x0_noise(x, model_fn(x, t), t)
            report(callback, i, t, x, x0)
            if (t_next == 0).all():
                x = parameterization.step_with_x0(x, x0, t, t_next)
                continue
            x_euler = parameterization.step_with_x0(x, x0, t, t_next)
            x0_next, _ = parameterization.to_x0_noise(x_euler, model_fn(x_euler, t_next), t_next)
            x = parameterization.step_with_x0(x, (x0 + x0_next) / 2, t, t_next)
        return x
