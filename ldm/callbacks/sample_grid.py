"""Saves and logs a grid of samples at every validation (with the EMA weights swapped in)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch

from ldm.run.guidance import resolve_guidance
from ldm.utils.images import log_image, make_grid, save_png, to_uint8


class SampleGrid(L.Callback):
    """One row per class (or one caption per cell), drawn from fixed noise so grids compare across steps.

    Keep it before the EMA callback in the callbacks list: callbacks' `on_validation_epoch_end` run in
    order, and the EMA callback swaps the training weights back in at that hook.
    """

    def __init__(self, dirpath: str, per_row: int = 8, seed: int = 0, upscale: int = 4, guidance=None):
        """`guidance`: an option of conf/guidance, a classifier-free scale, or null for `diffusion.sample_guidance`."""
        self.dirpath = Path(dirpath)
        self.per_row, self.seed, self.upscale = per_row, seed, upscale
        self.guidance, self.guided = guidance, None

    def render(self, trainer: L.Trainer, module, name: str) -> Path:
        conditions, n = trainer.datamodule.grid_conditions(self.per_row)
        generator = torch.Generator().manual_seed(self.seed)
        if self.guided is None:  # a weaker model or classifier is loaded once
            self.guided = resolve_guidance(self.guidance, module)
        images = module.sample(conditions, n, guidance=self.guided, generator=generator)
        path = save_png(make_grid(to_uint8(images), self.per_row), self.dirpath / f"{name}.png", self.upscale)
        for logger in trainer.loggers:
            log_image(logger, "samples", path, trainer.global_step)
        return path

    def on_validation_epoch_end(self, trainer, pl_module):
        if trainer.sanity_checking or trainer.global_step == 0 or not trainer.is_global_zero:
            return
        self.render(trainer, pl_module, f"step_{trainer.global_step:06d}")
