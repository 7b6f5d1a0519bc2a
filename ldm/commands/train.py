"""`train(cfg)`: one training run, callable from `train.py` or directly from tests.

What a run shares whatever it trains (trainer, loggers, checkpoints, resume) lives here; what it
trains is a task (`task: diffusion | autoencoder`, ldm.run.tasks). `python -m ldm.commands.train` is one
of a job's other ranks (ldm.run.ranks): it trains the job whose config arrives on stdin.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
import lightning as L
import torch
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from ldm.callbacks.ema import find_ema
from ldm.callbacks.finite_loss import StopOnNonFiniteLoss
from ldm.checks.hydra import CheckTrainingConfig, checked_by_hydra
from ldm.checks.training import check_training
from ldm.run.build import resolve_precision
from ldm.run.checkpoint_io import AtomicCheckpointIO
from ldm.run.init_from import init_from_run
from ldm.run.ranks import job_ranks, rank_config
from ldm.run.requeue import cluster_plugins
from ldm.run.tasks import TASKS
from ldm.utils.checkpoint import CheckpointError, load_checkpoint, newest_readable
from ldm.utils.errors import reported_user_errors

log = logging.getLogger(__name__)

def _instantiate_group(group: DictConfig | None) -> list:
    """Callbacks / loggers are configured as a mapping name -> config; null entries are switched off."""
    if not group:
        return []
    return [hydra.utils.instantiate(node) for node in group.values() if node is not None and "_target_" in node]


def counted_in_optimizer_steps(trainer_cfg: DictConfig) -> dict:
    """Trainer arguments that Lightning counts in batches, given in optimizer steps by the config.

    With `accumulate_grad_batches: N` an optimizer step takes N batches; Lightning counts `val_check_interval`
    in batches, so it is multiplied by N (every epoch holds whole steps, ldm/data/order.py, so a validation
    falls right after an optimizer step). `max_steps`, `log_every_n_steps` and step-interval LR schedules
    already count optimizer steps in Lightning."""
    accumulate = int(trainer_cfg.get("accumulate_grad_batches", 1) or 1)
    interval = trainer_cfg.get("val_check_interval")
    if accumulate == 1 or isinstance(interval, bool) or not isinstance(interval, int):
        return {}  # a float is a fraction of an epoch, a string or mapping a time: neither counts batches
    return {"val_check_interval": interval * accumulate}


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


def train(cfg: DictConfig) -> float | None:
    """Train the configured task; returns the best validation loss (the metric a sweeper optimizes)."""
    os.environ.setdefault("WANDB_MODE", "offline")
    if not checked_by_hydra(CheckTrainingConfig):
        check_training(cfg)
    task = TASKS[cfg.task]
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
    # a NaN or infinite loss stops the run before it reaches the weights (whatever the callbacks config says)
    callbacks = [*_instantiate_group(cfg.get("callbacks")), StopOnNonFiniteLoss()]
    if not loggers:  # Lightning refuses a learning-rate monitor with nothing to log to
        callbacks = [cb for cb in callbacks if not isinstance(cb, LearningRateMonitor)]
    trainer: L.Trainer = hydra.utils.instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers or False, plugins=[AtomicCheckpointIO(), *cluster_plugins()],
        precision=resolve_precision(cfg.trainer.get("precision", "auto"), str(cfg.trainer.get("accelerator", "auto"))),
        # the data module shards by rank itself (ldm/data/order.py), so a resumed epoch continues exactly
        use_distributed_sampler=False, **counted_in_optimizer_steps(cfg.trainer),
    )
    for logger in loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))

    module = task.prepare(cfg, datamodule, trainer.strategy.root_device)
    if resume_path:
        log.info("resuming from %s (step %d)", resume_path, resume_step)
    elif cfg.get("init_from") and not getattr(module, "has_base", False):
        # only when the run starts: a rerun of the same command resumes its own last.ckpt (a fine-tune's frozen
        # base came from init_from when the module was built, ldm.run.build)
        step = init_from_run(module, cfg.init_from)
        log.info("starting from the weights of %s (its step %d), with a fresh optimizer", cfg.init_from, step)
    with job_ranks(trainer, lambda: rank_config(cfg, str(run_dir.resolve()), resume_path)):
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume_path)
        if trainer.is_global_zero:
            task.finish(cfg, trainer, module, run_dir, find_ema(trainer))
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


def rank_main() -> None:
    """A rank started by ldm.run.ranks: train the job whose config arrives on stdin."""
    logging.basicConfig(level=logging.INFO, format=f"[rank {os.environ.get('LOCAL_RANK')}] %(message)s")
    cfg = OmegaConf.create(sys.stdin.read())
    with reported_user_errors():
        train(cfg)


if __name__ == "__main__":
    rank_main()
