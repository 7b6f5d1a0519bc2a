"""Data with a closed-form posterior mean E[x0 | x_t], hence a perfect network for any target.

They let tests and `sampler_table` measure a sampler's own error, with no training in the way;
`gaussian_problem` is the fixed 4-D test case they share.
"""

from __future__ import annotations

import torch

from ldm.schedules.base import Parameterization, expand_as

Tensor = torch.Tensor


class Gaussian:
    """x0 ~ N(mean, cov) in D dimensions."""

    def __init__(self, mean: Tensor, cov: Tensor):
        self.mean, self.cov = mean, cov
        # E[x0 | x_t] = m + alpha S (alpha^2 S + sigma^2 I)^-1 (x_t - alpha m): diagonal in S's eigenbasis.
        self.eigvals, self.eigvecs = torch.linalg.eigh(cov)

    def posterior_mean(self, x_t: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
        alpha, sigma = alpha[:, None], sigma[:, None]
        gain = alpha * self.eigvals / (alpha**2 * self.eigvals + sigma**2)  # (B, D)
        centred = (x_t - alpha * self.mean) @ self.eigvecs
        return self.mean + (gain * centred) @ self.eigvecs.T

    def log_density(self, x_t: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
        """log p_t(x_t), x_t ~ N(alpha mean, alpha^2 cov + sigma^2 I); (B,)."""
        alpha, sigma = alpha[:, None], sigma[:, None]
        var = alpha**2 * self.eigvals + sigma**2  # (B, D) in the eigenbasis
        centred = (x_t - alpha * self.mean) @ self.eigvecs
        return -0.5 * ((centred**2 / var) + var.log() + torch.log(torch.tensor(2 * torch.pi))).sum(-1)


class GaussianMixture:
    """x0 ~ sum_k w_k N(means[k], std^2 I) in D dimensions."""

    def __init__(self, means: Tensor, std: float, weights: Tensor | None = None):
        self.means, self.std = means, std
        self.weights = torch.full((len(means),), 1 / len(means)) if weights is None else weights

    def posterior_mean(self, x_t: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
        alpha, sigma = alpha[:, None], sigma[:, None]
        var = alpha**2 * self.std**2 + sigma**2  # (B, 1): x_t | k ~ N(alpha mu_k, var I)
        dist2 = ((x_t[:, None, :] - alpha[:, None] * self.means) ** 2).sum(-1)  # (B, K)
        resp = torch.softmax(self.weights.log().to(x_t) - dist2 / (2 * var), dim=1)
        gain = alpha * self.std**2 / var
        per_component = self.means + gain[:, None] * (x_t[:, None, :] - alpha[:, None] * self.means)
        return (resp[..., None] * per_component).sum(1)

    def _log_joint(self, x_t: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
        """log w_k + log N(x_t; alpha mu_k, (alpha^2 std^2 + sigma^2) I), (B, K)."""
        alpha, sigma = alpha[:, None], sigma[:, None]
        var = alpha**2 * self.std**2 + sigma**2
        dist2 = ((x_t[:, None, :] - alpha[:, None] * self.means) ** 2).sum(-1)
        dim = self.means.shape[1]
        return self.weights.log().to(x_t) - dist2 / (2 * var) - 0.5 * dim * torch.log(2 * torch.pi * var)

    def log_density(self, x_t: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
        """log p_t(x_t) of the noised mixture, (B,)."""
        return torch.logsumexp(self._log_joint(x_t, alpha, sigma), dim=1)

    def log_class_posterior(self, x_t: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
        """log p(k | x_t) for every component k (the exact noise-conditional classifier), (B, K)."""
        return torch.log_softmax(self._log_joint(x_t, alpha, sigma), dim=1)

    def component(self, k: int) -> Gaussian:
        """The k-th component, N(means[k], std^2 I): the data of class k."""
        dim = self.means.shape[1]
        return Gaussian(self.means[k], self.std**2 * torch.eye(dim, dtype=self.means.dtype))

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.means.shape[1], generator=generator, dtype=self.means.dtype)
        return self.means[k] + self.std * z


def perfect_model(data, p: Parameterization):
    """model_fn(x_t, t) returning p's target built from the exact x0_hat and noise_hat."""

    def model_fn(x_t: Tensor, t: Tensor) -> Tensor:
        alpha, sigma = p.alpha_sigma(t)
        x0 = data.posterior_mean(x_t, alpha, sigma)
        noise = (x_t - expand_as(alpha, x_t) * x0) / expand_as(sigma, x_t)
        return p.target(x0, noise, t)

    return model_fn


def gaussian_problem(dim: int = 4, seed: int = 0) -> Gaussian:
    """A fixed Gaussian with a non-diagonal covariance (eigenvalues 0.1 to 1.5), in float64."""
    g = torch.Generator().manual_seed(seed)
    rotation, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
    eigvals = torch.linspace(0.1, 1.5, dim, dtype=torch.float64)
    mean = torch.linspace(-0.6, 0.8, dim, dtype=torch.float64)
    return Gaussian(mean, rotation @ torch.diag(eigvals) @ rotation.T)
