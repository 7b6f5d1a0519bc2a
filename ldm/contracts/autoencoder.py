"""What the diffusion module needs from a first-stage model."""

from __future__ import annotations

import torch
from torch import nn

from ldm.utils.config import latent_size
from ldm.utils.noise import randn


def sample_posterior(mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator | None = None):
    """mean + std * unit noise, the noise drawn on the generator's device (a CPU generator works for CUDA)."""
    # drawn in float32 and then cast, so a seed gives the same latents whatever the precision
    return mean + std * randn(mean.shape, generator, device=mean.device).to(mean.dtype)


class Autoencoder(nn.Module):
    """Maps images (B, C, H, W) in [-1, 1] to latents (B, latent_channels, H / downsample, W / downsample).

    `encode_posterior` returns the mean and std of q(z | x) (std 0 for a deterministic encoder), so
    that a cache can store them and training still draws a fresh latent every step.
    """

    downsample: int
    latent_channels: int

    def encode_posterior(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def encode(self, images: torch.Tensor, sample: bool = True, generator: torch.Generator | None = None):
        mean, std = self.encode_posterior(images)
        return sample_posterior(mean, std, generator) if sample else mean

    def latent_shape(self, image_size: int) -> tuple[int, int, int]:
        side = latent_size(image_size, self.downsample)
        return (self.latent_channels, side, side)
