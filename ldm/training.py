"""`train(cfg)`: the whole training run, callable from `train.py` or directly from tests."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import hydra
import lightning as L
import torch
from lightning.pytorch.callbacks import LearningRateMonitor
from omegaconf import DictConfig, OmegaConf

from ldm.build import build_autoencoder_training, build_diffusion, resolve_precision
from ldm.data.cache import data_identity

log = logging.getLogger(__name__)


def _instantiate_group(group: DictConfig | None) -> list:
    """Callbacks / loggers are configured as a mapping name -> config; null entries are switched off."""
    if not group:
        return []
    return [hydra.utils.instantiate(node) for node in group.values() if node is not None and "_target_" in node]


def _resume_path(cfg: DictConfig, run_dir: Path) -> str | None:
    """`resume: auto` continues from this run directory's last.ckpt when one exists (a requeued job)."""
    if cfg.resume in (None, False):
        return None
    if cfg.resume == "auto":
        last = run_dir / "checkpoints" / "last.ckpt"
        return str(last) if last.is_file() else None
    if not Path(cfg.resume).is_file():
        raise FileNotFoundError(f"resume={cfg.resume}: no such checkpoint")
    return str(cfg.resume)


def train(cfg: DictConfig) -> float | None:
    """Train the configured task; returns the best validation loss (the metric a sweeper optimizes)."""
    os.environ.setdefault("WANDB_MODE", "offline")
    run_dir = Path(cfg.paths.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(cfg.seed, workers=True)
    torch.set_float32_matmul_precision("high")

    datamodule = hydra.utils.instantiate(cfg.data)
    loggers = _instantiate_group(cfg.get("logger"))
    callbacks = _instantiate_group(cfg.get("callbacks"))
    if not loggers:  # Lightning refuses a learning-rate monitor with nothing to log to
        callbacks = [cb for cb in callbacks if not isinstance(cb, LearningRateMonitor)]
    trainer: L.Trainer = hydra.utils.instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers or False,
        precision=resolve_precision(cfg.trainer.get("precision", "auto")),
    )
    for logger in loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))

    if cfg.task == "autoencoder":
        module = build_autoencoder_training(cfg)
    else:
        module = build_diffusion(cfg).to(trainer.strategy.root_device)
        datamodule.setup("fit")
        datamodule.attach_cache(module.autoencoder, module.conditioner, data_identity(cfg.data), module.device)
        module.measure_latent_stats(datamodule.train_dataloader())
        log.info("latent scale %.4f, shift %.4f", module.latent_scale.item(), module.latent_shift.item())

    trainer.fit(module, datamodule=datamodule, ckpt_path=_resume_path(cfg, run_dir))

    save_last_checkpoint(trainer)
    if trainer.is_global_zero:
        finish(cfg, trainer, module, run_dir)
    for logger in loggers:  # close runs that stay open (wandb): flushes them, and the next multirun job starts anew
        close = getattr(getattr(logger, "experiment", None), "finish", None)
        if callable(close):
            close()
    best = trainer.checkpoint_callback.best_model_score if trainer.checkpoint_callback else None
    if best is None:
        best = trainer.callback_metrics.get("val/loss")
    print(f"run directory: {run_dir.resolve()}")
    return float(best) if best is not None else None


def save_last_checkpoint(trainer: L.Trainer) -> None:
    """Fit can stop between validations (max_time, a max_steps off the interval): keep last.ckpt current.

    Every rank calls it (saving is a collective under sharded strategies)."""
    checkpoint = trainer.checkpoint_callback
    if checkpoint is None or trainer.fast_dev_run or checkpoint.dirpath is None:
        return
    if getattr(checkpoint, "_last_global_step_saved", -1) != trainer.global_step:
        trainer.save_checkpoint(Path(checkpoint.dirpath) / "last.ckpt")


def finish(cfg: DictConfig, trainer: L.Trainer, module, run_dir: Path) -> None:
    """After fit (EMA weights are in the module now): final artifacts of the run."""
    if cfg.task == "autoencoder":
        for path in module.export(run_dir):
            log.info("saved autoencoder weights to %s", path)
        return
    grid = next((cb for cb in trainer.callbacks if hasattr(cb, "render")), None)
    if grid is not None:
        path = grid.render(trainer, module, "final")
        log.info("final sample grid: %s", path)

