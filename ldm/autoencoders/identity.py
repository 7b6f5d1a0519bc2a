"""Pixel-space diffusion: the 'autoencoder' that changes nothing."""

from __future__ import annotations

import torch

from ldm.contracts.autoencoder import Autoencoder


class IdentityAutoencoder(Autoencoder):
    def __init__(self, latent_channels: int, downsample: int = 1):
        super().__init__()
        if downsample != 1:
            raise ValueError(f"autoencoder=identity has downsample 1, got {downsample}")
        self.latent_channels = latent_channels
        self.downsample = 1

    def encode_posterior(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return images, torch.zeros_like(images)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents
