"""A sampler's error on Gaussian data: the 2-Wasserstein distance from its output law to N(m, S).

Deterministic samplers are affine in the noise when the model is exact for Gaussian data, so their
output law is computed exactly from D + 1 inputs; stochastic ones are estimated from samples and
floor at the Monte-Carlo error.
"""

from __future__ import annotations

import torch

from ldm.tools.exact_gaussian import Gaussian, perfect_model

Tensor = torch.Tensor


def _sqrtm(matrix: Tensor) -> Tensor:
    vals, vecs = torch.linalg.eigh(matrix)
    return vecs @ torch.diag(vals.clamp(min=0).sqrt()) @ vecs.T


def w2_gaussian(mean1: Tensor, cov1: Tensor, mean2: Tensor, cov2: Tensor) -> float:
    """2-Wasserstein distance between two Gaussians."""
    root2 = _sqrtm(cov2)
    cross = _sqrtm(root2 @ cov1 @ root2)
    w2 = (mean1 - mean2).pow(2).sum() + torch.trace(cov1 + cov2 - 2 * cross)
    return w2.clamp(min=0).sqrt().item()


def output_moments(sampler, parameterization, data: Gaussian, steps: int, n_samples: int = 20000, seed: int = 0):
    """Mean and covariance of the sampler's output (exact if it is deterministic)."""
    model_fn = perfect_model(data, parameterization)
    dim = len(data.mean)
    g = torch.Generator().manual_seed(seed)
    if not sampler.stochastic:
        basis = torch.cat([torch.zeros(1, dim), torch.eye(dim)]).double()
        out = sampler(model_fn, basis, parameterization, steps)
        columns = out[1:] - out[0]  # output = out[0] + columns.T @ noise
        return out[0], columns.T @ columns
    noise = torch.randn(n_samples, dim, generator=g, dtype=torch.float64)
    out = sampler(model_fn, noise, parameterization, steps, generator=g)
    return out.mean(0), torch.cov(out.T)


def sampler_error(sampler, parameterization, data: Gaussian, steps: int, n_samples: int = 20000,
                  seed: int = 0) -> float:
    """W2 between the sampler's output law and the data's N(m, S)."""
    mean, cov = output_moments(sampler, parameterization, data, steps, n_samples, seed)
    return w2_gaussian(mean, cov, data.mean, data.cov)
