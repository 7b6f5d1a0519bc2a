"""What a run trains (`task: diffusion | autoencoder | classifier`): how each is built before `fit` and what it
leaves after.

A task is a `Task(prepare, finish)`: `prepare(cfg, datamodule, device)` returns the LightningModule,
`finish(cfg, trainer, module, run_dir, ema)` writes its final artifacts on rank 0 (`ema`: the run's EMA
callback, or None).
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, NamedTuple

import hydra
import lightning as L
import torch
from omegaconf import DictConfig

from ldm.data.cache import data_identity
from ldm.run.build import build_autoencoder_training, build_classifier_training, build_diffusion

log = logging.getLogger(__name__)


def prepare_diffusion(cfg: DictConfig, datamodule, device):
    """The LatentDiffusion with the offline cache attached and the latent scale measured."""
    module = build_diffusion(cfg).to(device)
    datamodule.setup("fit")
    datamodule.attach_cache(module.autoencoder, module.conditioner, data_identity(cfg.data), module.device)
    # from the first 20 optimizer steps' items: batch B accumulated over N measures what batch N * B would
    steps = 20 * int(cfg.trainer.get("accumulate_grad_batches", 1) or 1)
    module.measure_latent_stats(datamodule.train_dataloader(), max_batches=steps)
    log.info("latent scale %.4f, shift %.4f", module.latent_scale.item(), module.latent_shift.item())
    return module


def finish_diffusion(cfg: DictConfig, trainer: L.Trainer, module, run_dir: Path, ema=None) -> None:
    """The final sample grid, drawn with the EMA weights once the EMA has started."""
    grid = next((cb for cb in trainer.callbacks if hasattr(cb, "render")), None)
    if grid is None:
        return
    with ema.applied(module) if ema is not None else nullcontext():
        path = grid.render(trainer, module, "final")
    log.info("final sample grid: %s", path)


def prepare_classifier(cfg: DictConfig, datamodule, device):
    """The noise-conditional classifier, reading the offline cache of a diffusion run of the same data, with the
    latent scale measured as that run measures it (same seed, data and batches: the same value)."""
    module = build_classifier_training(cfg).to(device)
    datamodule.setup("fit")
    with torch.random.fork_rng(devices=[]):  # the cache's key names the conditioner's frozen parts, as training's
        torch.manual_seed(cfg.seed)
        conditioner = hydra.utils.instantiate(cfg.conditioner)
    datamodule.attach_cache(module.autoencoder, conditioner, data_identity(cfg.data), module.device)
    steps = 20 * int(cfg.trainer.get("accumulate_grad_batches", 1) or 1)
    module.measure_latent_stats(datamodule.train_dataloader(), max_batches=steps)
    log.info("latent scale %.4f, shift %.4f", module.latent_scale.item(), module.latent_shift.item())
    return module


def finish_classifier(cfg: DictConfig, trainer: L.Trainer, module, run_dir: Path, ema=None) -> None:
    log.info("classifier for guidance: guidance=classifier guidance.classifier_run=%s", run_dir.resolve())


def prepare_autoencoder(cfg: DictConfig, datamodule, device):
    return build_autoencoder_training(cfg)


def finish_autoencoder(cfg: DictConfig, trainer: L.Trainer, module, run_dir: Path, ema=None) -> None:
    """Stage 1 ends with its weights exported as safetensors."""
    for path in module.export(run_dir):
        log.info("saved autoencoder weights to %s", path)


class Task(NamedTuple):
    prepare: Callable
    finish: Callable


TASKS = {"diffusion": Task(prepare_diffusion, finish_diffusion),
         "autoencoder": Task(prepare_autoencoder, finish_autoencoder),
         "classifier": Task(prepare_classifier, finish_classifier)}
