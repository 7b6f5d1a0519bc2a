"""Training task `autoencoder` (stage 1): train the KL-VAE and export its weights as safetensors."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
from omegaconf import DictConfig

from ldm.build import build_autoencoder_training

log = logging.getLogger(__name__)


def prepare(cfg: DictConfig, datamodule, device):
    return build_autoencoder_training(cfg)


def finish(cfg: DictConfig, trainer: L.Trainer, module, run_dir: Path) -> None:
    for path in module.export(run_dir):
        log.info("saved autoencoder weights to %s", path)
