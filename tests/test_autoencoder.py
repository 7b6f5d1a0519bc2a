"""The shipped digits VAE reconstructs held-out digits; identity is exact; bad weights are named."""

from __future__ import annotations

import pytest
import torch

from ldm.autoencoders.identity import IdentityAutoencoder
from ldm.autoencoders.kl import KLAutoencoder, resolve_weights
from ldm.data.digits import DigitsDataset

# mean squared error on [-1, 1] images of the 300 held-out digits (never seen in training)
RECONSTRUCTION_MSE_BOUND = 0.01


def shipped_vae() -> KLAutoencoder:
    return KLAutoencoder(in_channels=1, latent_channels=4, channels=16, channel_mult=[1, 2],
                         weights="digits_vae").eval()


def test_shipped_vae_is_small():
    assert resolve_weights("digits_vae").stat().st_size < 2 * 1024 * 1024


def test_shipped_vae_reconstructs_held_out_digits():
    images = DigitsDataset("val").images
    vae = shipped_vae()
    with torch.no_grad():
        recon = vae.decode(vae.encode(images, sample=False))
    mse = (recon.clamp(-1, 1) - images).pow(2).mean().item()
    blank = (images - images.mean()).pow(2).mean().item()
    assert mse < RECONSTRUCTION_MSE_BOUND, f"held-out reconstruction MSE {mse:.4f}"
    assert mse < 0.05 * blank


def test_broken_vae_fails_the_bound():
    images = DigitsDataset("val").images[:64]
    vae = shipped_vae()
    with torch.no_grad():
        vae.decoder.net[0].weight.mul_(0.0)
        recon = vae.decode(vae.encode(images, sample=False))
    assert (recon.clamp(-1, 1) - images).pow(2).mean().item() > RECONSTRUCTION_MSE_BOUND


def test_latent_shape_and_identity():
    assert shipped_vae().latent_shape(32) == (4, 8, 8)
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    identity = IdentityAutoencoder(latent_channels=1)
    assert torch.equal(identity.decode(identity.encode(x)), x)
    with pytest.raises(ValueError, match="not divisible"):
        shipped_vae().latent_shape(30)


def test_missing_weights_are_named():
    with pytest.raises(FileNotFoundError, match="no_such_vae"):
        KLAutoencoder(weights="no_such_vae")
