"""The SD VAE (autoencoder=sd_vae) against diffusers' AutoencoderKL of the same configuration.

A step encodes a batch of images to the posterior mean and decodes it, without gradients: the VAE is
frozen while the denoiser trains, and runs only to build the latent cache and to decode samples.
"""

from __future__ import annotations

import importlib.util
from tempfile import TemporaryDirectory

import hydra
import torch

from ldm.tools.bench.configs import CONF, group_config
from ldm.tools.bench.measure import Comparison, Member, parameter_count

CONFIG = "sd_vae"


def available() -> str | None:
    """None when the project has an SD VAE to compare, else why not."""
    if not (CONF / "autoencoder" / f"{CONFIG}.yaml").is_file():
        return f"conf/autoencoder/{CONFIG}.yaml does not exist"
    if importlib.util.find_spec("ldm.autoencoders.sd_vae") is None:
        return "ldm/autoencoders/sd_vae.py does not exist"
    return None


def vae_pair(batch_size: int, device: torch.device, image_size: int = 128, channels: int = 32) -> Comparison:
    """autoencoder=sd_vae at base width `channels` (128 in SD), both sides with the same random weights."""
    from diffusers import AutoencoderKL  # deferred: diffusers is heavy and optional

    cfg = group_config("autoencoder", CONFIG, in_channels=3, channels=channels)
    levels = len(cfg.channel_mult)
    reference = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=cfg.latent_channels, layers_per_block=cfg.num_res_blocks,
        block_out_channels=tuple(cfg.channels * m for m in cfg.channel_mult), norm_num_groups=32,
        down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
        use_quant_conv=cfg.use_quant_conv, use_post_quant_conv=cfg.use_quant_conv, sample_size=image_size)
    with TemporaryDirectory() as directory:
        reference.save_pretrained(directory)
        model = hydra.utils.instantiate(cfg, weights=directory)
    model, reference = model.to(device).eval(), reference.to(device).eval()
    images = torch.rand(batch_size, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    images = (2 * images - 1).to(device)

    @torch.no_grad()
    def project_step():
        mean, _ = model.encode_posterior(images)
        return model.decode(mean)

    @torch.no_grad()
    def reference_step():
        return reference.decode(reference.encode(images).latent_dist.mean).sample

    widths = "-".join(str(cfg.channels * m) for m in cfg.channel_mult)
    return Comparison(
        group="autoencoders", name=f"sd_vae {widths} encode+decode {image_size}x{image_size}",
        batch_size=batch_size,
        members=[Member("ldm SDAutoencoder", project_step, parameter_count(model)),
                 Member("diffusers AutoencoderKL", reference_step, parameter_count(reference))],
        note="diffusers' random weights saved to a directory and loaded by the project; encode to the "
             "posterior mean, decode it, no gradients, no tiling or slicing")
