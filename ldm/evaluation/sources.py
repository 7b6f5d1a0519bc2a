"""The three image sources evaluation scores, each addressed by index: samples drawn from a model, a sample
file of sample.py, and a split of real images (or their reconstructions by the run's autoencoder).

`source.batch(indices)` gives {"images", and "label" / "caption" where the images answer to one}; the one
scoring loop (ldm.evaluation.scoring) and the in-training callback feed these into a metric suite.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import default_collate

from ldm.evaluation.seeded import CAPTION, LABEL, Conditions, SamplingSettings, seeded_samples
from ldm.utils.images import to_uint8


class ModelSamples:
    """Sample i of `module`, asking for condition i; drawn in the precision the predict loop runs in."""

    def __init__(self, module: nn.Module, conditions: Conditions, settings: SamplingSettings, count: int):
        self.module, self.conditions, self.settings, self.count = module, conditions, settings, count
        self.keys = list(conditions.input_keys)
        self.uses_precision = True  # sampling runs in the configured precision (bf16 autocast by default)

    def batch(self, indices: Sequence[int]) -> dict:
        asked = self.conditions(indices)
        return {"images": seeded_samples(self.module, asked, indices, self.settings).float(), **asked}


class SampleFile:
    """The images of a sample file with the labels or prompts they were drawn for (labels -1: none asked)."""

    def __init__(self, path: str | Path):
        samples = np.load(path, allow_pickle=False)
        self.images = samples["images"]
        labels = samples["labels"] if "labels" in samples.files else None
        self.labels = None if labels is not None and (labels < 0).any() else labels
        self.prompts = [str(p) for p in samples["prompts"]] if "prompts" in samples.files else None
        self.keys = [key for key, given in ((LABEL, self.labels), (CAPTION, self.prompts)) if given is not None]
        self.count, self.module, self.uses_precision = len(self.images), None, False

    def batch(self, indices: Sequence[int]) -> dict:
        part = slice(indices[0], indices[-1] + 1)  # index batches are contiguous
        out = {"images": self.images[part]}
        if self.labels is not None:
            out[LABEL] = self.labels[part]
        if self.prompts is not None:
            out[CAPTION] = self.prompts[part]
        return out


class RealImages:
    """The first `count` images of a data split, each with its own label or caption; with an `autoencoder`,
    its reconstructions of them (a latent model can do no better than its first stage)."""

    def __init__(self, dataset, keys: Sequence[str], count: int, autoencoder: nn.Module | None = None):
        self.dataset, self.keys, self.module = dataset, list(keys), autoencoder
        self.count, self.uses_precision = min(count, len(dataset)), False

    def batch(self, indices: Sequence[int]) -> dict:
        items = default_collate([self.dataset[i] for i in indices])
        images = items["image"]
        if self.module is not None:
            device = next(self.module.parameters(), images).device
            images = self.module.decode(self.module.encode(images.to(device), sample=False)).clamp(-1, 1)
        return {"images": images, **{key: items[key] for key in self.keys if key in items}}


def score_indices(source, suite, indices: Sequence[int], kept: dict | None = None, keep: int = 0) -> dict:
    """Add the source's images `indices` to `suite` with what they answer to; keep (uint8, with their caption)
    those below `keep`. Returns the batch."""
    batch = source.batch(indices)
    images = batch["images"]
    suite.update(images, real=False, labels=batch.get(LABEL), captions=batch.get(CAPTION))
    if kept is not None and indices[0] < keep:
        shown = to_uint8(images) if torch.is_tensor(images) else images
        captions = batch.get(CAPTION)
        for position, index in enumerate(indices):
            if index < keep:
                kept[index] = (shown[position], captions[position] if captions is not None else None)
    return batch
