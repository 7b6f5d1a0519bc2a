"""A NaN or infinite training loss stops the run at once, before the optimizer step it would poison.

The run ends with one `error:` line naming the step and the value, the last good checkpoint and what to
change (exit status 2, no traceback; ldm/utils/errors.py). Nothing is saved after the bad step: `last.ckpt`
stays the one of the last validation, which `resume=auto` continues from once the setting is fixed.
"""

from __future__ import annotations

import math

import lightning as L
import torch

from ldm.callbacks.last_checkpoint import LastCheckpoint
from ldm.utils.errors import UserError


class NonFiniteLoss(UserError):
    """The training loss is NaN or infinite (most often a learning rate that is too high)."""


class StopOnNonFiniteLoss(L.Callback):
    """Checks every loss before its backward pass (automatic and manual optimization alike)."""

    def on_before_backward(self, trainer, pl_module, loss: torch.Tensor) -> None:
        value = float(loss.detach().float().sum())
        if math.isfinite(value):
            return
        raise NonFiniteLoss(non_finite_message(trainer, value))


def non_finite_message(trainer: L.Trainer, value: float) -> str:
    last = next((cb for cb in trainer.callbacks if isinstance(cb, LastCheckpoint)), None)
    if last is not None and last.path.is_file():
        kept = f"the last good checkpoint is kept: {last.path} (step {last.saved_step})"
    else:
        kept = "no checkpoint was written before it"
    lr = f" (now {trainer.optimizers[0].param_groups[0]['lr']:g})" if trainer.optimizers else ""
    return (f"the training loss is {value} at step {trainer.global_step}: stopped before the optimizer step, "
            f"{kept}; lower optimizer.lr{lr}, set trainer.gradient_clip_val (e.g. 1.0), or check the data, "
            "then run again")
