"""Real-data statistics for the metrics, computed once per data set, split, feature network and resolution.

A reference holds the float64 mean and covariance of every real image's features (for the Fréchet
distance) and the features of a seeded random subset of at most `max_features` images (for KID and the
k-NN metrics). It is cached like the latents (ldm/data/cache_file.py: one builder under a file lock, an
atomic write, a check on read) in a file whose name hashes everything the statistics depend on.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from ldm.data import cache_file
from ldm.data.cache_file import InvalidCache
from ldm.metrics.features import FeatureBackend, unit_images

#: bump when what a reference file holds or how it is computed changes: older files are then never read
REFERENCE_FORMAT = 1


@dataclass
class Reference:
    """mean (D,) and cov (D, D) in float64 over `count` images, `features` (M, D) of a subset, the cache `key`."""

    mean: torch.Tensor
    cov: torch.Tensor
    count: int
    features: torch.Tensor
    key: str = ""


def reference_key(backend: FeatureBackend, data_config: dict, split: str, dataset: Dataset, max_features: int,
                  seed: int) -> str:
    """Hash of what the statistics depend on: data config and content, split, image shape, network and weights."""
    content = dataset.content_fingerprint() if hasattr(dataset, "content_fingerprint") else None
    identity = {"format": REFERENCE_FORMAT, "data": data_config, "split": split, "content": content,
                "length": len(dataset), "image_shape": list(dataset[0]["image"].shape),
                "features": backend.provenance() | {"weights": None}, "max_features": max_features, "seed": seed}
    # the weights file's place does not matter, its hash does
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:20]


@torch.no_grad()
def compute_reference(backend: FeatureBackend, dataset: Dataset, max_features: int = 10_000, seed: int = 0,
                      batch_size: int = 256, device=None) -> Reference:
    """Statistics of every `dataset[i]["image"]` (float (C, H, W) in [-1, 1]) seen through `backend`."""
    device = device or next(backend.parameters()).device
    keep = torch.zeros(len(dataset), dtype=torch.bool)
    keep[torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:max_features]] = True
    total = outer = None
    kept = []
    start = 0
    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        features = backend(unit_images(batch["image"]).to(device)).double()
        if total is None:
            total = torch.zeros(features.shape[1], dtype=torch.float64, device=device)
            outer = torch.zeros(features.shape[1], features.shape[1], dtype=torch.float64, device=device)
        total += features.sum(dim=0)
        outer += features.T @ features
        kept.append(features[keep[start:start + len(features)].to(device)].float().cpu())
        start += len(features)
    if start < 2:
        raise ValueError(f"reference statistics need at least 2 images, the data set has {start}")
    mean = total / start
    # the same estimate torchmetrics' FID makes from its running sums: (sum x x^T - n mean mean^T) / (n - 1)
    cov = (outer - start * torch.outer(mean, mean)) / (start - 1)
    return Reference(mean.cpu(), cov.cpu(), start, torch.cat(kept))


def _checker(feature_dim: int, count: int):
    def check(contents) -> None:
        tensors, metadata = contents
        if metadata.get("format") != str(REFERENCE_FORMAT):
            raise InvalidCache(f"format {metadata.get('format')}, expected {REFERENCE_FORMAT}")
        shapes = {key: tuple(value.shape) for key, value in tensors.items()}
        expected = {"mean": (feature_dim,), "cov": (feature_dim, feature_dim)}
        if any(shapes.get(key) != shape for key, shape in expected.items()) or "features" not in shapes \
                or metadata.get("count") != str(count):
            raise InvalidCache(f"it holds {shapes} of {metadata.get('count')} images, expected {expected} of {count}")
    return check


def load_or_compute_reference(backend: FeatureBackend, dataset: Dataset, split: str, data_config: dict,
                              cache_dir: str | Path, max_features: int = 10_000, seed: int = 0,
                              batch_size: int = 256, device=None) -> Reference:
    """This split's reference: read from `cache_dir` if a valid file with its key exists, else computed and written."""
    key = reference_key(backend, data_config, split, dataset, max_features, seed)
    path = Path(cache_dir) / f"reference-{backend.name}-{split}-{key}.safetensors"

    def build():
        ref = compute_reference(backend, dataset, max_features, seed, batch_size, device)
        tensors = {"mean": ref.mean, "cov": ref.cov, "features": ref.features}
        return tensors, {"format": str(REFERENCE_FORMAT), "count": str(ref.count),
                         "provenance": json.dumps(backend.provenance())}

    tensors, metadata = cache_file.load_or_build(path, build, _checker(backend.feature_dim, len(dataset)))
    return Reference(tensors["mean"], tensors["cov"], int(metadata["count"]), tensors["features"], key)
