"""Saves and logs validation images beside their autoencoder reconstructions."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import torch

from ldm.utils.images import log_image, make_grid, save_png, to_uint8


class Reconstructions(L.Callback):
    """Rows alternate: originals, then their reconstructions."""

    def __init__(self, dirpath: str, count: int = 16, upscale: int = 4):
        self.dirpath, self.count, self.upscale = Path(dirpath), count, upscale

    def on_validation_epoch_end(self, trainer, pl_module):
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        images = torch.stack([trainer.datamodule.val_set[i]["image"] for i in range(self.count)])
        recon = pl_module.reconstruct(images.to(pl_module.device))
        pairs = np.concatenate([to_uint8(images), to_uint8(recon)])
        path = save_png(make_grid(pairs, self.count), self.dirpath / f"recon_{trainer.global_step:06d}.png",
                        self.upscale)
        for logger in trainer.loggers:
            log_image(logger, "reconstructions", path, trainer.global_step)
