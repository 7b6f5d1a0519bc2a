"""Training task `diffusion`: build the LatentDiffusion, attach the cache, measure the latent scale."""

from __future__ import annotations

import logging
from contextlib import nullcontext
from pathlib import Path

import lightning as L
from omegaconf import DictConfig

from ldm.build import build_diffusion
from ldm.callbacks.ema import find_ema
from ldm.data.cache import data_identity

log = logging.getLogger(__name__)


def prepare(cfg: DictConfig, datamodule, device):
    module = build_diffusion(cfg).to(device)
    datamodule.setup("fit")
    datamodule.attach_cache(module.autoencoder, module.conditioner, data_identity(cfg.data), module.device)
    module.measure_latent_stats(datamodule.train_dataloader())
    log.info("latent scale %.4f, shift %.4f", module.latent_scale.item(), module.latent_shift.item())
    return module


def finish(cfg: DictConfig, trainer: L.Trainer, module, run_dir: Path) -> None:
    """The final sample grid, drawn with the EMA weights once the EMA has started."""
    grid = next((cb for cb in trainer.callbacks if hasattr(cb, "render")), None)
    if grid is None:
        return
    ema = find_ema(trainer)
    with ema.applied(module) if ema is not None else nullcontext():
        path = grid.render(trainer, module, "final")
    log.info("final sample grid: %s", path)
