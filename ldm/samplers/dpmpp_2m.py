"""DPM-Solver++(2M) (Lu et al. 2022): multistep, data prediction, in lambda = log(alpha / sigma).

The data estimate is extrapolated linearly in lambda from the last two x0_hat, then used in the
exact exponential-integrator update. The first step (no history) and the last (lambda = inf)
are first order. Where alpha = 0 (lambda = -inf) the extrapolation weight is 0, i.e. first order.
"""

from ldm.samplers.base import Sampler, intervals, report


def log_snr_half(parameterization, t):
    alpha, sigma = parameterization.alpha_sigma(t)
    return alpha.log() - sigma.log()


class DPMSolverPP2M(Sampler):
    def sample(self, model_fn, x, parameterization, times, generator, callback):
        lambdas = log_snr_half(parameterization, times)
        x0_prev = None
        for i, t, t_next in intervals(times, x):
            x0, _ = parameterization.to_x0_noise(x, model_fn(x, t), t)
            report(callback, i, t, x, x0)
            estimate = x0
            if x0_prev is not None and times[i + 1] > 0:
                h, h_prev = lambdas[i + 1] - lambdas[i], lambdas[i] - lambdas[i - 1]
                estimate = x0 + h / (2 * h_prev) * (x0 - x0_prev)
            x = parameterization.step_with_x0(x, estimate, t, t_next)
            x0_prev = x0
        return x
