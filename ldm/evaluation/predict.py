"""Sampling and scoring through `trainer.predict`: every rank draws its contiguous share of the sample indices
and adds them to the metric suite, whose `compute` then gives every rank the numbers of all samples."""

from __future__ import annotations

import logging

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

from ldm.evaluation.draw import Conditions, SamplingSettings, draw, index_batches
from ldm.images import to_uint8

log = logging.getLogger(__name__)


class SampleEvaluation(L.LightningModule):
    """Draws samples 0..n-1 of `diffusion` in batches of `batch_size`; keeps the first `keep` as uint8 images."""

    def __init__(self, diffusion: L.LightningModule, suite, conditions: Conditions, settings: SamplingSettings,
                 n: int, batch_size: int, keep: int = 100):
        super().__init__()
        self.diffusion, self.suite = diffusion, suite
        self.conditions, self.settings = conditions, settings
        self.n, self.batch_size, self.keep = n, batch_size, keep
        self.kept: dict[int, np.ndarray] = {}

    def predict_dataloader(self) -> DataLoader:
        batches = index_batches(self.n, self.batch_size, self.trainer.global_rank, self.trainer.world_size)
        batches = [torch.tensor(batch) for batch in batches]
        return DataLoader(batches, batch_size=None)

    def predict_step(self, indices: torch.Tensor, batch_idx: int) -> int:
        score_batch(self.diffusion, self.suite, self.conditions, self.settings, indices.tolist(), self.kept, self.keep)
        if self.global_rank == 0:  # a line per batch: visible in a piped log too
            log.info("sampled %d/%d (rank 0 of %d)", int(indices[-1]) + 1, self.n // self.trainer.world_size,
                     self.trainer.world_size)
        return len(indices)  # what the prediction loop collects; the samples went into the suite

    def kept_images(self) -> np.ndarray | None:
        """The kept samples in index order, (K, H, W, C) uint8."""
        return np.stack([self.kept[i] for i in sorted(self.kept)]) if self.kept else None


def score_batch(diffusion, suite, conditions: Conditions, settings: SamplingSettings, indices: list[int],
                kept: dict[int, np.ndarray] | None = None, keep: int = 0) -> dict:
    """Draw the samples `indices`, add them to `suite` with what they asked for; keep those below `keep`."""
    asked = conditions(indices)
    images = draw(diffusion, asked, indices, settings).float()
    suite.update(images, real=False, labels=asked.get("label"), captions=asked.get("caption"))
    if kept is not None and indices[0] < keep:
        for index, image in zip(indices, to_uint8(images), strict=True):
            if index < keep:
                kept[index] = image
    return asked
