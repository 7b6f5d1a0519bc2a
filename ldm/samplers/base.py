"""What every sampler shares: the time grid, the starting point, and the per-step callback."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ldm.schedules.base import Parameterization, expand_as

Tensor = torch.Tensor

# callback({"i": step index, "t": (B,) time, "x": x_t, "x0": x0_hat}), once per step, before the update.
Callback = Callable[[dict], None]


def batch_time(t: Tensor, x: Tensor) -> Tensor:
    """One time for the whole batch, as the (B,) tensor the contract takes."""
    return t.expand(x.shape[0])


def intervals(times: Tensor, x: Tensor):
    """(i, t, t_next) for each step of the grid, the times as (B,) batch times."""
    for i in range(len(times) - 1):
        yield i, batch_time(times[i], x), batch_time(times[i + 1], x)


def report(callback: Callback | None, i: int, t: Tensor, x: Tensor, x0: Tensor) -> None:
    if callback is not None:
        callback({"i": i, "t": t, "x": x, "x0": x0})


class Sampler:
    """`x0 = sampler(model_fn, noise, parameterization, steps, generator=None, callback=None)`.

    model_fn(x_t, t) -> prediction in the parameterization's target space; `callback` sees each step.
    """

    stochastic = False  # whether it draws fresh noise (uses `generator`)

    def calls(self, steps: int) -> int:
        """Network calls for `steps` steps."""
        return steps

    @torch.no_grad()
    def __call__(
        self,
        model_fn,
        noise: Tensor,
        parameterization: Parameterization,
        steps: int,
        generator: torch.Generator | None = None,
        callback: Callback | None = None,
    ) -> Tensor:
        times = parameterization.timesteps(steps).to(device=noise.device, dtype=noise.dtype)
        _, sigma_start = parameterization.alpha_sigma(times[:1])
        # The noisiest level may keep a little data (alpha > 0); starting from sigma * noise is the
        # usual practice, since the data mean is unknown.
        x = expand_as(sigma_start, noise) * noise
        return self.sample(model_fn, x, parameterization, times, generator, callback)

    def sample(self, model_fn, x: Tensor, parameterization: Parameterization, times: Tensor, generator,
               callback: Callback | None) -> Tensor:
        """Integrate from times[0] down to times[-1] = 0, calling `report` once per step."""
        raise NotImplementedError
