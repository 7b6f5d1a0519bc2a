"""Kernel distance (KID): the unbiased MMD^2 with the cubic polynomial kernel, averaged over random subsets.

k(x, y) = (x.y / D + 1)^3, as published (Binkowski et al. 2018). torchmetrics computes it; the suite
hands it features already gathered from every rank, so it runs here without syncing, and a fixed seed
makes every rank (and every rerun) draw the same subsets.
"""

from __future__ import annotations

import warnings

import torch
from torchmetrics.image.kid import KernelInceptionDistance

from ldm.metrics.frechet import PassThrough


def kernel_distance(real: torch.Tensor, fake: torch.Tensor, subsets: int = 100, subset_size: int = 1000,
                    seed: int = 0) -> tuple[float, float, int]:
    """(mean, std over subsets, subset size used): subsets hold min(subset_size, len(real), len(fake)) samples."""
    size = min(subset_size, len(real), len(fake))
    if size < 2:
        raise ValueError(f"KID needs at least 2 real and 2 generated samples, got {len(real)} and {len(fake)}")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        metric = KernelInceptionDistance(feature=PassThrough(real.shape[1]), subsets=subsets, subset_size=size,
                                         sync_on_compute=False)
    metric = metric.to(real.device)
    metric.update(real.double(), real=True)
    metric.update(fake.double(), real=False)
    with torch.random.fork_rng(devices=[]):  # torchmetrics draws subsets with the global CPU generator
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std), size
