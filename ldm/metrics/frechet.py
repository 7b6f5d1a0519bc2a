"""Fréchet distance between Gaussians fitted to two feature sets: torchmetrics' FID on features the suite extracts.

||mu_r - mu_f||^2 + Tr(S_r + S_f - 2 (S_r S_f)^(1/2)). torchmetrics accumulates the sums and outer
products in float64 and syncs them across ranks (sum). Reference statistics from the cache enter the
real side of rank 0 only for the duration of `compute`, so the sum over ranks counts them once.
"""

from __future__ import annotations

import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance


class PassThrough(nn.Module):
    """The "feature network" of the torchmetrics metrics here: features are extracted once, by the suite."""

    def __init__(self, feature_dim: int):
        super().__init__()
        self.num_features = feature_dim  # torchmetrics reads the state size from this attribute

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features.double()


def frechet_metric(feature_dim: int) -> FrechetInceptionDistance:
    """An FID metric whose `update(features, real)` takes (N, feature_dim) features."""
    return FrechetInceptionDistance(feature=PassThrough(feature_dim), reset_real_features=True)


def rank() -> int:
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    return torch.distributed.get_rank() if distributed else 0


def compute_with_reference(metric: FrechetInceptionDistance, mean: torch.Tensor, cov: torch.Tensor,
                           count: int) -> torch.Tensor:
    """The distance between the reference Gaussian (mean, cov of `count` samples) and the fake features seen."""
    names = ("real_features_sum", "real_features_cov_sum", "real_features_num_samples")
    saved = {name: getattr(metric, name) for name in names}
    if any(value.count_nonzero() for value in saved.values()):
        raise ValueError("the FID metric has real features of its own as well as a reference: give one of them")
    if rank() == 0:
        mean = mean.to(saved["real_features_sum"])
        # the states torchmetrics would hold after `count` samples with this mean and covariance
        metric.real_features_sum = mean * count
        metric.real_features_cov_sum = cov.to(mean) * (count - 1) + count * torch.outer(mean, mean)
        metric.real_features_num_samples = torch.tensor(count, device=mean.device)
    try:
        return metric.compute()
    finally:
        for name, value in saved.items():
            setattr(metric, name, value)
