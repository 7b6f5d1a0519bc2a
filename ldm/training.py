"""`train(cfg)`: one training run, callable from `train.py` or directly from tests.

What a run shares whatever it trains (trainer, loggers, checkpoints, resume) lives here; what it
trains is a task (`task: diffusion | autoencoder`), a module with `prepare(cfg, datamodule, device)`
returning the LightningModule and `finish(cfg, trainer, module, run_dir)` for its final artifacts.
"""

from __future__ import annotations

import importlib
import logging
import os
from pathlib import Path

import hydra
import lightning as L
import torch
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from ldm.build import resolve_precision
from ldm.callbacks.last_checkpoint import newest_readable
from ldm.checkpoint import CheckpointError, load_checkpoint
from ldm.checkpoint_io import AtomicCheckpointIO
from ldm.checks import check_training
from ldm.distributed import job_ranks, rank_config
from ldm.requeue import cluster_plugins

log = logging.getLogger(__name__)

TASKS = {"diffusion": "ldm.diffusion_task", "autoencoder": "ldm.autoencoders.task"}


def _instantiate_group(group: DictConfig | None) -> list:
    """Callbacks / loggers are configured as a mapping name -> config; null entries are switched off."""
    if not group:
        return []
    return [hydra.utils.instantiate(node) for node in group.values() if node is not None and "_target_" in node]


def resume_checkpoint(cfg: DictConfig, run_dir: Path) -> tuple[str | None, int | None]:
    """The checkpoint to continue from and its step.

    `resume: auto` takes this run directory's last.ckpt, or, when that cannot be read, the newest
    readable checkpoint beside it (with a warning); none at all starts the run afresh."""
    if cfg.resume in (None, False):
        return None, None
    if cfg.resume == "auto":
        try:
            found = newest_readable(run_dir / "checkpoints")
        except CheckpointError as err:
            raise CheckpointError(f"resume=auto: {err}") from err
        if found is None:
            return None, None
        path, checkpoint = found
    else:
        path = Path(cfg.resume)
        try:
            checkpoint = load_checkpoint(path, mmap=True)  # only its step is read here
        except CheckpointError as err:
            raise CheckpointError(f"resume={cfg.resume}: {err}") from err
    return str(path), int(checkpoint["global_step"])


def task_module(name: str):
    if name not in TASKS:
        raise ValueError(f"task={name} is not a task; use one of {', '.join(TASKS)}")
    return importlib.import_module(TASKS[name])


def train(cfg: DictConfig) -> float | None:
    """Train the configured task; returns the best validation loss (the metric a sweeper optimizes)."""
    os.environ.setdefault("WANDB_MODE", "offline")
    check_training(cfg)
    task = task_module(cfg.task)
    run_dir = Path(cfg.paths.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(cfg.seed, workers=True)
    torch.set_float32_matmul_precision("high")
    # float32 values below 1.2e-38 count as 0: a CPU computes on such (denormal) numbers 10-25x slower, and
    # they are common early on (the squared gradients behind zero-initialized adaLN-Zero gates)
    torch.set_flush_denormal(True)
    resume_path, resume_step = resume_checkpoint(cfg, run_dir)

    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.shuffle_seed = cfg.seed
    loggers = _instantiate_group(cfg.get("logger"))
    for logger in loggers:  # a resumed run continues its logs from the checkpoint's step
        if hasattr(logger, "resume_step"):
            logger.resume_step = resume_step
    callbacks = _instantiate_group(cfg.get("callbacks"))
    if not loggers:  # Lightning refuses a learning-rate monitor with nothing to log to
        callbacks = [cb for cb in callbacks if not isinstance(cb, LearningRateMonitor)]
    trainer: L.Trainer = hydra.utils.instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers or False, plugins=[AtomicCheckpointIO(), *cluster_plugins()],
        precision=resolve_precision(cfg.trainer.get("precision", "auto"), str(cfg.trainer.get("accelerator", "auto"))),
        # the data module shards by rank itself (ldm/data/order.py), so a resumed epoch continues exactly
        use_distributed_sampler=False,
    )
    for logger in loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))

    module = task.prepare(cfg, datamodule, trainer.strategy.root_device)
    if resume_path:
        log.info("resuming from %s (step %d)", resume_path, resume_step)
    with job_ranks(trainer, lambda: rank_config(cfg, str(run_dir.resolve()), resume_path)):
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume_path)
        if trainer.is_global_zero:
            task.finish(cfg, trainer, module, run_dir)
        for logger in loggers:  # close runs that stay open (wandb): flushes them, and the next multirun job starts anew
            close = getattr(getattr(logger, "experiment", None), "finish", None)
            if callable(close):
                close()
    if trainer.is_global_zero:
        print(f"run directory: {run_dir.resolve()}")
    return best_metric(trainer)


def best_metric(trainer: L.Trainer) -> float | None:
    best = next((cb.best_model_score for cb in trainer.callbacks if isinstance(cb, ModelCheckpoint)), None)
    if best is None:
        best = trainer.callback_metrics.get("val/loss")
    return float(best) if best is not None else None
