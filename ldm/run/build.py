"""Build the parts of a run from its composed config (shared by training and sampling)."""

from __future__ import annotations

import logging

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from ldm.finetune import Full
from ldm.run.init_from import init_from_run
from ldm.tasks.autoencoder import AutoencoderTraining
from ldm.tasks.classifier import ClassifierTraining
from ldm.tasks.diffusion import LatentDiffusion

log = logging.getLogger(__name__)


def build_diffusion(cfg: DictConfig):
    """Instantiate autoencoder, conditioner, denoiser, schedule, sampler and optimizer into a `LatentDiffusion`, and
    apply the fine-tune (`finetune`): a frozen base (lora, partial) is the denoiser of model.weights, or, with
    init_from, that run's weights, loaded here, before the adapters wrap it, whenever the run is rebuilt."""
    # frozen parts without a weight file (a random text tower, a fresh VAE) must come out the same
    # whenever the run is rebuilt, so they are drawn from the run's seed, apart from the global stream
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        autoencoder = hydra.utils.instantiate(cfg.autoencoder)
        conditioner = hydra.utils.instantiate(cfg.conditioner)
    module = LatentDiffusion(
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
    finetune = hydra.utils.instantiate(cfg.finetune) if cfg.get("finetune") else Full()
    if finetune.has_base and cfg.get("init_from"):
        step = init_from_run(module, cfg.init_from)
        log.info("base: the weights of %s (its step %d)", cfg.init_from, step)
    module.adapt(finetune)
    return module


def build_classifier_training(cfg: DictConfig) -> ClassifierTraining:
    """The noise-conditional classifier of `task=classifier`, on the latents a diffusion run of this config sees
    (the same autoencoder, drawn from the run's seed, and the same diffusion.scale_factor / shift_factor)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        autoencoder = hydra.utils.instantiate(cfg.autoencoder)
    latents = OmegaConf.to_container(cfg.diffusion, resolve=True)
    return ClassifierTraining(
        autoencoder=autoencoder,
        classifier=hydra.utils.instantiate(cfg.classifier),
        schedule=hydra.utils.instantiate(cfg.schedule),
        image_size=cfg.data.image_size,
        optimizer=hydra.utils.instantiate(cfg.optimizer),
        lr_scheduler=hydra.utils.instantiate(cfg.lr_scheduler) if cfg.get("lr_scheduler") else None,
        scale_factor=latents.get("scale_factor"), shift_factor=latents.get("shift_factor", 0.0), seed=cfg.seed,
    )


def build_autoencoder_training(cfg: DictConfig):
    settings = OmegaConf.to_container(cfg.vae, resolve=True)
    return AutoencoderTraining(hydra.utils.instantiate(cfg.autoencoder), **settings)


def resolve_precision(precision: str | int, accelerator: str = "auto") -> str | int:
    """`auto`: bf16 autocast where the device computes bf16 faster than fp32, full precision elsewhere.

    GPUs with bf16 support, and CPUs with bf16 matrix units (AMX, AVX512-BF16): there, bf16 autocast is
    about 1.6x faster for the default run; on other CPUs bf16 is emulated and slower than fp32.
    """
    if precision != "auto":
        return precision
    if uses_gpu(accelerator):
        return "bf16-mixed" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "32-true"
    return "bf16-mixed" if accelerator in ("cpu", "auto") and cpu_has_bf16_units() else "32-true"


def uses_gpu(accelerator: str) -> bool:
    """Whether Lightning's `accelerator` setting runs on CUDA GPUs here (auto: when there are any)."""
    return accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())


def cpu_has_bf16_units() -> bool:
    return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())
