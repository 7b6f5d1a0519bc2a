"""What every sampler shares: the time grid, the starting point, and the data-prediction update."""

from __future__ import annotations

import torch

from ldm.schedules.base import Parameterization, expand_as

Tensor = torch.Tensor


def batch_time(t: Tensor, x: Tensor) -> Tensor:
    """One time for the whole batch, as the (B,) tensor the contract takes."""
    return t.expand(x.shape[0])


def intervals(times: Tensor, x: Tensor):
    """Consecutive (t, t_next) of the grid, each as a (B,) batch time."""
    for i in range(len(times) - 1):
        yield batch_time(times[i], x), batch_time(times[i + 1], x)


def randn_like(x: Tensor, generator: torch.Generator | None) -> Tensor:
    """Unit noise shaped like x, drawn on the generator's device (a CPU generator works for CUDA x)."""
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)


def step_with_x0(p: Parameterization, x: Tensor, x0: Tensor, t: Tensor, t_next: Tensor) -> Tensor:
    """x_next = alpha' x0 + sigma' (x - alpha x0) / sigma: p.step when x0 is the model's own x0_hat.

    Higher-order samplers pass a combined data estimate instead; for alpha = 1 this is the Euler
    step in sigma, and in general the exact solution of the ODE for a constant data prediction.
    """
    alpha, sigma = p.alpha_sigma(t)
    alpha_next, sigma_next = p.alpha_sigma(t_next)
    noise = (x - expand_as(alpha, x) * x0) / expand_as(sigma, x)
    return expand_as(alpha_next, x) * x0 + expand_as(sigma_next, x) * noise


class Sampler:
    """`x0 = sampler(model_fn, noise, p, steps, generator=None)`, model_fn(x_t, t) -> prediction."""

    stochastic = False  # whether it draws fresh noise (uses `generator`)

    def calls(self, steps: int) -> int:
        """Network calls for `steps` steps."""
        return steps

    @torch.no_grad()
    def __call__(self, model_fn, noise: Tensor, p: Parameterization, steps: int, generator=None) -> Tensor:
        times = p.timesteps(steps).to(device=noise.device, dtype=noise.dtype)
        _, sigma_start = p.alpha_sigma(times[:1])
        # The noisiest level may keep a little data (alpha > 0); starting from sigma * noise is the
        # usual practice, since the data mean is unknown.
        x = expand_as(sigma_start, noise) * noise
        return self.sample(model_fn, x, p, times, generator)

    def sample(self, model_fn, x: Tensor, p: Parameterization, times: Tensor, generator) -> Tensor:
        """Integrate from times[0] down to times[-1] = 0."""
        raise NotImplementedError
