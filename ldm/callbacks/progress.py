"""Training progress: a rich bar of the run's steps on a terminal, plain lines when stdout is a file or a pipe.

A rich or tqdm bar redraws one line in place; written to a SLURM log, `nohup` or `| tee`, that shows
nothing until the end. `PlainTextProgress` prints whole lines instead, e.g.

    step 120/2500  train/loss 0.4321  images/s 245.3  elapsed 0:00:15  eta 0:04:58
    step 500/2500  val/loss 0.4012
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Mapping
from datetime import timedelta

import torch
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar


def progress_bar(every_n_steps: int | None = None, every_seconds: float | None = 10.0) -> ProgressBar:
    """The bar for where stdout goes: rich on a terminal, plain lines otherwise.

    Both are ProgressBar callbacks, so Lightning adds no default bar of its own beside them."""
    if sys.stdout.isatty():
        return StepProgressBar()
    return PlainTextProgress(every_n_steps=every_n_steps, every_seconds=every_seconds)


def total_steps(trainer) -> float:
    """max_steps, or what max_epochs amounts to (inf when neither limits the run)."""
    return trainer.max_steps if trainer.max_steps > 0 else trainer.estimated_stepping_batches


def step_text(trainer) -> str:
    total = total_steps(trainer)
    return f"step {trainer.global_step}/{int(total) if math.isfinite(total) else '?'}"


class StepProgressBar(RichProgressBar):
    """Lightning's rich bar over the whole run in optimizer steps ("step 1200/2000"), not over one epoch's batches.

    Runs here stop at trainer.max_steps with unbounded epochs (max_epochs=-1), where Lightning's own bar reads
    "Epoch 5/-2", starts again at every epoch and never shows the step; a resumed run starts at its step."""

    @property
    def total_train_batches(self) -> float | None:
        total = total_steps(self.trainer)
        return total if math.isfinite(total) else None  # rich: of unknown length

    def _get_train_description(self, current_epoch: int) -> str:
        return step_text(self.trainer)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if self.train_progress_bar_id is None:  # one bar for the whole run: made once, never reset per epoch
            super().on_train_epoch_start(trainer, pl_module)
            self._show_step(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self.is_disabled and self.train_progress_bar_id is None:
            self._initialize_train_progress_bar_id()
        self._show_step(trainer)
        self._update_metrics(trainer, pl_module)
        self.refresh()

    def _show_step(self, trainer) -> None:
        if self.progress is None or self.is_disabled or self.train_progress_bar_id is None:
            return
        description = step_text(trainer)
        if self.theme.description:
            description = f"[{self.theme.description}]{description}"
        self.progress.update(self.train_progress_bar_id, completed=trainer.global_step, description=description)


def _batch_size(batch) -> int | None:
    """The number of items in a batch: the first dimension of its first tensor."""
    if isinstance(batch, torch.Tensor):
        return batch.shape[0] if batch.ndim else None
    values = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (list, tuple)) else ()
    for value in values:
        if (size := _batch_size(value)) is not None:
            return size
    return None


def _duration(seconds: float) -> str:
    return str(timedelta(seconds=int(seconds)))


def _format(value) -> str:
    value = value.item() if isinstance(value, torch.Tensor) else value
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class PlainTextProgress(ProgressBar):
    """One line every `every_n_steps` optimizer steps or `every_seconds` seconds (whichever comes first;
    None switches one off), one after each validation, and one at the end."""

    def __init__(self, every_n_steps: int | None = None, every_seconds: float | None = 10.0):
        super().__init__()
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"callbacks.progress.every_n_steps={every_n_steps}: use a positive number or null")
        self.every_n_steps, self.every_seconds = every_n_steps, every_seconds
        self._enabled = True

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def print(self, *args, **kwargs) -> None:
        print(*args, **kwargs, flush=True)

    # ---- when ----

    def on_train_start(self, trainer, pl_module) -> None:
        now = time.monotonic()
        self._start_time = self._last_time = now
        self._start_step = self._last_step = trainer.global_step  # a resumed run starts past 0
        self._images = 0             # since the last line
        self._validation_time = 0.0  # since the last line: not part of the training rate

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # each rank draws a batch of this size: images/s counts all of them
        self._images += (_batch_size(batch) or 0) * trainer.world_size
        step = trainer.global_step
        if not self._enabled or step == self._last_step:  # mid gradient accumulation: no new step yet
            return
        by_steps = self.every_n_steps is not None and step % self.every_n_steps == 0
        by_time = self.every_seconds is not None and time.monotonic() - self._last_time >= self.every_seconds
        if by_steps or by_time:
            self._print_training_line(trainer)

    def on_validation_start(self, trainer, pl_module) -> None:
        self._validation_started = time.monotonic()

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or not hasattr(self, "_start_time"):
            return
        self._validation_time += time.monotonic() - self._validation_started
        metrics = {k: v for k, v in trainer.callback_metrics.items() if k.startswith("val")}
        if self._enabled and metrics:
            self.print(f"{step_text(trainer)}  " + "  ".join(f"{k} {_format(v)}" for k, v in metrics.items()))

    def on_train_end(self, trainer, pl_module) -> None:
        if self._enabled and trainer.global_step != self._last_step:
            self._print_training_line(trainer)

    # ---- what ----

    def _print_training_line(self, trainer) -> None:
        now = time.monotonic()
        step, total = trainer.global_step, total_steps(trainer)
        training_time = now - self._last_time - self._validation_time
        parts = [step_text(trainer)]
        parts += [f"{k} {_format(v)}" for k, v in self.get_metrics(trainer, trainer.lightning_module).items()
                  if k != "v_num" and not k.startswith("val")]
        if training_time > 0 and self._images:
            parts.append(f"images/s {self._images / training_time:.1f}")
        elapsed = now - self._start_time
        parts.append(f"elapsed {_duration(elapsed)}")
        # the average over this run so far, validations included: what the remaining steps will cost
        if math.isfinite(total) and step > self._start_step:
            parts.append(f"eta {_duration(elapsed / (step - self._start_step) * max(total - step, 0))}")
        self.print("  ".join(parts))
        self._last_time, self._last_step, self._images, self._validation_time = now, step, 0, 0.0
