"""The keys a training batch carries, and the functions that read them.

A batch from a dataset holds `image` (B, C, H, W) in [-1, 1] plus the dataset's own fields
(`label`, `caption`, ...). A batch from the offline cache (ldm/data/cache.py, the only writer of
the keys below) holds the same fields without `image`, and instead:

- `latent_mean`, `latent_std` (B, C', H', W'): the autoencoder's posterior, so each step still
  draws a fresh latent;
- `cond.{i}.{output}`: output `output` (`vector`, `tokens`, `token_mask`, ...) of the conditioner's
  i-th embedder, for the frozen embedders.

The diffusion module and the conditioner read batches only through the functions here.
"""

from __future__ import annotations

import torch

from ldm.contracts.autoencoder import sample_posterior

IMAGE = "image"
LATENT_MEAN = "latent_mean"
LATENT_STD = "latent_std"


def condition_key(index: int, output: str) -> str:
    """Key under which embedder `index`'s precomputed `output` travels."""
    return f"cond.{index}.{output}"


def latents_from_batch(batch: dict, autoencoder, sample: bool = True, generator: torch.Generator | None = None,
                       device=None) -> torch.Tensor:
    """Raw (unscaled) latents: a posterior draw (or its mean) from the cache, else by encoding `image`."""
    if LATENT_MEAN in batch:
        mean, std = batch[LATENT_MEAN].to(device), batch[LATENT_STD].to(device)
        return sample_posterior(mean, std, generator) if sample else mean
    if IMAGE not in batch:
        raise KeyError(f"the batch has neither '{IMAGE}' nor the cache's '{LATENT_MEAN}': it has {sorted(batch)}")
    with torch.no_grad():
        return autoencoder.encode(batch[IMAGE].to(device), sample=sample, generator=generator)


def cached_outputs(batch: dict, index: int, outputs: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Embedder `index`'s precomputed outputs if the batch comes from the cache, else an empty dict."""
    return {out: batch[condition_key(index, out)] for out in outputs if condition_key(index, out) in batch}
