"""scikit-learn's handwritten digits (1,797 8x8 images shipped in the package), resized for diffusion."""

from __future__ import annotations

import os
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ldm.utils.errors import ConfigError

NUM_VAL = 300
SPLIT_SEED = 0


@lru_cache(maxsize=1)
def load_digits_8x8() -> tuple[np.ndarray, np.ndarray]:
    """All digits as float images (N, 8, 8) in [0, 16] and labels (N,)."""
    from sklearn.datasets import load_digits  # deferred: scikit-learn is slow to import

    data = load_digits()
    return data.images.astype(np.float32), data.target.astype(np.int64)


def split_indices(split: str) -> np.ndarray:
    """A fixed train/validation split: the last NUM_VAL of a seeded permutation are validation."""
    images, _ = load_digits_8x8()
    order = np.random.default_rng(SPLIT_SEED).permutation(len(images))
    if split == "train":
        return np.sort(order[:-NUM_VAL])
    if split == "val":
        return np.sort(order[-NUM_VAL:])
    raise ValueError(f"split must be 'train' or 'val', got '{split}'")


def to_model_range(images_8x8: np.ndarray, image_size: int) -> torch.Tensor:
    """(N, 8, 8) in [0, 16] -> (N, 1, S, S) in [-1, 1], bilinear resize."""
    x = torch.from_numpy(images_8x8).float().unsqueeze(1) / 8.0 - 1.0
    if image_size != 8:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return x.clamp(-1.0, 1.0)


def physical_memory() -> int | None:
    """This machine's memory in bytes (None where the system does not say)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, OSError, ValueError):
        return None


def check_fits_in_memory(count: int, image_size: int) -> None:
    """The resized images are held in memory: refuse a size they would not fit at, before allocating them."""
    needed, available = count * image_size * image_size * 4, physical_memory()
    if available is not None and needed > available:
        raise ConfigError([f"data.image_size={image_size}: the digits data set keeps its {count} images in memory "
                           f"(float32), {needed / 1e9:,.0f} GB at this size, more than this machine's "
                           f"{available / 1e9:,.0f} GB: use a smaller size, e.g. data.image_size=32 (the digits "
                           "are 8x8 images, scaled up)"])


def thickened(images: torch.Tensor, pixels: int) -> torch.Tensor:
    """Strokes grown by `pixels` on every side (a grey-level dilation: the brightest value within that distance)."""
    return F.max_pool2d(images, 2 * pixels + 1, stride=1, padding=pixels) if pixels else images


class DigitsDataset(Dataset):
    """Items: `image` (1, S, S) in [-1, 1] and `label` (0-9). `thicken`: strokes grown by this many pixels, a new
    domain of the same digits (experiment=digits_lora adapts the default run to it)."""

    num_classes = 10

    def __init__(self, split: str = "train", image_size: int = 32, thicken: int = 0):
        images, labels = load_digits_8x8()
        index = split_indices(split)
        check_fits_in_memory(len(index), image_size)
        self.images = thickened(to_model_range(images[index], image_size), thicken)
        self.labels = torch.from_numpy(labels[index])

    def __len__(self) -> int:
        return len(self.labels)

    def metadata(self, i: int) -> dict:
        """The item without its image (what training from the cache reads)."""
        return {"label": self.labels[i]}

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], **self.metadata(i)}
