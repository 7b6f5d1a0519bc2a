"""Sampler error versus network calls on a 4-D Gaussian with an exact model.

Run `python -m ldm.samplers.error_table`. The error is the 2-Wasserstein distance between N(m, S)
and the Gaussian fitted to the output. Deterministic samplers are affine in the noise here, so
their output law is computed exactly from D + 1 inputs; stochastic ones are estimated from samples
and floor at the Monte-Carlo error (~0.02 with 20k samples).

Reading it: ddpm, v and x0 share a data row, and an exact model gives every target the same
(x0_hat, noise_hat), so their columns agree. Starting from sigma(1) * noise ignores alpha(1) * m,
which leaves a floor for VP with alpha(1) > 0 (~0.006 for linear betas) and for EDM's finite
sigma_max (~0.012). The last step, to t = 0, is first order by design; its error is of order
sigma_last^2, which on the discrete VP grids is only O(1 / steps) and slows heun and dpmpp_2m there."""

from __future__ import annotations

import argparse

import torch

from ldm.samplers import DDPMSampler, DPMSolverPP2M, Euler, EulerAncestral, Heun
from ldm.samplers.exact import Gaussian, perfect_model
from ldm.schedules import DDPM, EDM, RectifiedFlow, TrigFlow, VPrediction, X0Prediction

Tensor = torch.Tensor


def parameterizations() -> dict:
    return {
        "flow": RectifiedFlow(),
        "flow_s3": RectifiedFlow(shift=3.0),
        "ddpm": DDPM(),
        "v": VPrediction(),
        "x0": X0Prediction(),
        "v_ztsnr": VPrediction(beta_schedule="scaled_linear", zero_terminal_snr=True),
        "edm": EDM(),
        "trig": TrigFlow(),
    }


def samplers() -> dict:
    return {
        "euler": Euler(),
        "heun": Heun(),
        "dpmpp_2m": DPMSolverPP2M(),
        "ddpm": DDPMSampler(),
        # eta = 1 repeats `ddpm` draw for draw, so show the half-way sampler instead.
        "euler_anc_0.5": EulerAncestral(eta=0.5),
    }


def gaussian_problem(dim: int = 4, seed: int = 0) -> Gaussian:
    """A fixed Gaussian with a non-diagonal covariance (eigenvalues 0.1 to 1.5), in float64."""
    g = torch.Generator().manual_seed(seed)
    rotation, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
    eigvals = torch.linspace(0.1, 1.5, dim, dtype=torch.float64)
    mean = torch.linspace(-0.6, 0.8, dim, dtype=torch.float64)
    return Gaussian(mean, rotation @ torch.diag(eigvals) @ rotation.T)


def _sqrtm(matrix: Tensor) -> Tensor:
    vals, vecs = torch.linalg.eigh(matrix)
    return vecs @ torch.diag(vals.clamp(min=0).sqrt()) @ vecs.T


def w2_gaussian(mean1: Tensor, cov1: Tensor, mean2: Tensor, cov2: Tensor) -> float:
    """2-Wasserstein distance between two Gaussians."""
    root2 = _sqrtm(cov2)
    cross = _sqrtm(root2 @ cov1 @ root2)
    w2 = (mean1 - mean2).pow(2).sum() + torch.trace(cov1 + cov2 - 2 * cross)
    return w2.clamp(min=0).sqrt().item()


def output_moments(sampler, p, data: Gaussian, steps: int, n_samples: int = 20000, seed: int = 0):
    """Mean and covariance of the sampler's output (exact if it is deterministic)."""
    model_fn = perfect_model(data, p)
    dim = len(data.mean)
    g = torch.Generator().manual_seed(seed)
    if not sampler.stochastic:
        basis = torch.cat([torch.zeros(1, dim), torch.eye(dim)]).double()
        out = sampler(model_fn, basis, p, steps)
        columns = out[1:] - out[0]  # output = out[0] + columns.T @ noise
        return out[0], columns.T @ columns
    noise = torch.randn(n_samples, dim, generator=g, dtype=torch.float64)
    out = sampler(model_fn, noise, p, steps, generator=g)
    return out.mean(0), torch.cov(out.T)


def sampler_error(sampler, p, data: Gaussian, steps: int, n_samples: int = 20000, seed: int = 0) -> float:
    mean, cov = output_moments(sampler, p, data, steps, n_samples, seed)
    return w2_gaussian(mean, cov, data.mean, data.cov)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[5, 10, 20, 50, 100])
    parser.add_argument("--samples", type=int, default=20000, help="for the stochastic samplers")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # tensors of a few thousand numbers: threads only add overhead
    data, schedules = gaussian_problem(), parameterizations()
    print(f"W2 to N(m, S), 4-D; stochastic samplers: Monte Carlo with {args.samples} samples")
    print(f"{'sampler':<16}{'steps':>6}{'calls':>6}" + "".join(f"{name:>10}" for name in schedules))
    for sampler_name, sampler in samplers().items():
        for steps in args.steps:
            errors = [sampler_error(sampler, p, data, steps, args.samples) for p in schedules.values()]
            row = f"{sampler_name:<16}{steps:>6}{sampler.calls(steps):>6}"
            print(row + "".join(f"{e:>10.4f}" for e in errors), flush=True)


if __name__ == "__main__":
    main()
