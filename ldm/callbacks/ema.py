"""Exponential moving average of the trainable weights, used wherever the run shows results.

Before the first update (`update_starting_at_step`) there is no average and the raw weights are used.
Validation, sample grids and the final grid run with the average swapped in; checkpoints hold the
raw weights as `state_dict` and the average as `ema_state_dict`, so training always resumes from the
raw trajectory and `sample.py` reads the average.

Lightning's EMAWeightAveraging is not used because it averages every parameter and buffer (frozen
autoencoder and text towers too), swaps its copy of the initial weights in before the first update,
and leaves the average in the module after fit, where a final checkpoint then stores it as the raw weights.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager

import lightning as L
import torch

from ldm.utils.checkpoint import EMA_KEY


def trainable_parameters(module: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The parameters the optimizer moves: the only ones worth averaging (frozen parts never change)."""
    return {name: p for name, p in module.named_parameters() if p.requires_grad}


@contextmanager
def weights_applied(module: torch.nn.Module, weights: dict[str, torch.Tensor] | None):
    """Temporarily copy `weights` into the module's parameters of the same names (no-op for None)."""
    if not weights:
        yield
        return
    params = dict(module.named_parameters())
    backup = {name: params[name].detach().clone() for name in weights}
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)
    try:
        yield
    finally:
        with torch.no_grad():
            for name, value in backup.items():
                params[name].copy_(value)


class EMA(L.Callback):
    """average <- decay * average + (1 - decay) * weights after every optimizer step from `update_starting_at_step`."""

    def __init__(self, decay: float = 0.999, update_starting_at_step: int = 0, update_every_n_steps: int = 1):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"callbacks.ema.decay must be in [0, 1), got {decay}")
        if update_starting_at_step < 0 or update_every_n_steps < 1:
            raise ValueError("callbacks.ema.update_starting_at_step must be >= 0 and update_every_n_steps >= 1, "
                             f"got {update_starting_at_step} and {update_every_n_steps}")
        self.decay = decay
        self.update_starting_at_step = update_starting_at_step
        self.update_every_n_steps = update_every_n_steps
        self.average: dict[str, torch.Tensor] | None = None  # None until the first update
        self._last_step = -1
        self._swap = ExitStack()

    @property
    def started(self) -> bool:
        return self.average is not None

    def applied(self, module: torch.nn.Module):
        """Context in which the module holds the average (or its raw weights before the EMA started)."""
        return weights_applied(module, self.average)

    @torch.no_grad()
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step  # counts optimizer steps; unchanged while gradients accumulate
        if step == self._last_step or step < self.update_starting_at_step or step % self.update_every_n_steps:
            return
        self._last_step = step
        params = trainable_parameters(pl_module)
        if self.average is None:
            self.average = {name: p.detach().clone() for name, p in params.items()}
            return
        for name, p in params.items():
            average = self.average[name]
            if average.device != p.device:
                average = self.average[name] = average.to(p.device)
            average.lerp_(p.detach(), 1.0 - self.decay)

    def on_validation_start(self, trainer, pl_module):
        self._swap.enter_context(self.applied(pl_module))

    def on_validation_end(self, trainer, pl_module):
        # runs before ModelCheckpoint's hook (Lightning calls checkpoint callbacks last): saves see raw weights
        self._swap.close()

    def on_exception(self, trainer, pl_module, exception):
        self._swap.close()

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        if self.average is not None:
            checkpoint[EMA_KEY] = {name: value.detach().cpu() for name, value in self.average.items()}

    def on_load_checkpoint(self, trainer, pl_module, checkpoint):
        average = checkpoint.get(EMA_KEY)
        self.average = {name: value.clone() for name, value in average.items()} if average else None
        self._last_step = checkpoint.get("global_step", -1)


def find_ema(trainer: L.Trainer) -> EMA | None:
    return next((cb for cb in trainer.callbacks if isinstance(cb, EMA)), None)
