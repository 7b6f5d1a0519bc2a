"""Build the parts of a run from its composed config (shared by training and sampling)."""

from __future__ import annotations

import hydra
import torch
from omegaconf import DictConfig, OmegaConf


def build_diffusion(cfg: DictConfig):
    """Instantiate autoencoder, conditioner, denoiser, schedule, sampler and optimizer into a `LatentDiffusion`."""
    from ldm.diffusion import LatentDiffusion

    # frozen parts without a weight file (a random text tower, a fresh VAE) must come out the same
    # whenever the run is rebuilt, so they are drawn from the run's seed, apart from the global stream
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        autoencoder = hydra.utils.instantiate(cfg.autoencoder)
        conditioner = hydra.utils.instantiate(cfg.conditioner)
    return LatentDiffusion(
        autoencoder=autoencoder,
        conditioner=conditioner,
        denoiser=hydra.utils.instantiate(cfg.model),
        schedule=hydra.utils.instantiate(cfg.schedule),
        sampler=hydra.utils.instantiate(cfg.sampler),
        image_size=cfg.data.image_size,
        optimizer=hydra.utils.instantiate(cfg.optimizer),
        lr_scheduler=hydra.utils.instantiate(cfg.lr_scheduler) if cfg.get("lr_scheduler") else None,
        seed=cfg.seed,
        **OmegaConf.to_container(cfg.diffusion, resolve=True),
    )


def build_autoencoder_training(cfg: DictConfig):
    from ldm.autoencoders.training import AutoencoderTraining

    settings = OmegaConf.to_container(cfg.vae, resolve=True)
    return AutoencoderTraining(hydra.utils.instantiate(cfg.autoencoder), **settings)


def resolve_precision(precision: str | int) -> str | int:
    """`auto`: bf16 autocast on GPUs that support it, full precision elsewhere."""
    if precision != "auto":
        return precision
    return "bf16-mixed" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "32-true"
