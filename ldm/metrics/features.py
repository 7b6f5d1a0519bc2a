"""What every feature backend shares: image conversion, weight-file checks and the provenance record.

A backend is a frozen network from images to (N, D) features. Its `forward` takes float images
(N, C, H, W) in [0, 1] on the 256 levels of 8-bit images (`unit_images` makes them), so that samples
scored during training and the same samples read back from PNG or npz files give the same features.
"""

from __future__ import annotations

import hashlib
import os
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ldm.utils.errors import UserError
from ldm.weights.files import WeightsError


def unit_images(images: torch.Tensor | np.ndarray) -> torch.Tensor:
    """float (N, C, H, W) in [-1, 1] (the data sets' and samples' range) or uint8 (N, H, W, C) (sample files)
    -> float32 (N, C, H, W) in [0, 1], rounded to 8-bit levels as a saved image would be."""
    x = torch.as_tensor(images)
    if x.ndim != 4:
        raise UserError(f"images must have 4 dimensions, got shape {tuple(x.shape)}: give float (N, C, H, W) "
                        "in [-1, 1] or uint8 (N, H, W, C)")
    if x.dtype == torch.uint8:
        if x.shape[-1] not in (1, 3):
            raise UserError(f"uint8 images must be (N, H, W, C) with 1 or 3 channels, got shape {tuple(x.shape)}")
        return x.permute(0, 3, 1, 2).float() / 255.0
    if not x.is_floating_point():
        raise UserError(f"images must be float in [-1, 1] or uint8, got {x.dtype}")
    if x.shape[1] not in (1, 3):
        raise UserError(f"float images must be (N, C, H, W) with 1 or 3 channels, got shape {tuple(x.shape)}")
    # the same rounding as ldm.utils.images.to_uint8, which writes sample grids and files
    return ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round() / 255.0


def rgb(images: torch.Tensor) -> torch.Tensor:
    """Grey images repeated to three channels, as the published feature networks expect."""
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


def resize(images: torch.Tensor, size: int, mode: str = "bicubic") -> torch.Tensor:
    """Square resize; antialiased so that shrinking large samples does not alias."""
    if images.shape[-2:] == (size, size):
        return images
    return nn.functional.interpolate(images, size=(size, size), mode=mode, align_corners=False, antialias=True)


def file_sha256(path: str | Path) -> str:
    path = Path(path)
    stat = path.stat()
    return _sha256(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=16)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    # keyed by size and modification time too: a file replaced in place is hashed again
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def require_weights(weights: str | os.PathLike | None, backend: str, expected: str, source: str) -> Path:
    """The weights file given for `backend`, or a WeightsError naming the file to provide and the key to set."""
    hint = (f"metrics.backend={backend} needs {expected} ({source}): put it on this machine and set "
            f"metrics.weights.{backend}=/path/to/{expected}")
    if weights is None:
        raise WeightsError(f"no weights file given; {hint}")
    path = Path(weights).expanduser()
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist; {hint}")
    return path


class FeatureBackend(nn.Module):
    """Frozen images -> features network; subclasses set `name` and `feature_dim` and implement `forward`."""

    name: str = "features"
    feature_dim: int = 0
    encodes_text = False  # whether `text_alignment(images, features, captions)` gives CLIP-score embeddings

    def __init__(self, weights_path: str | Path, settings: dict | None = None):
        super().__init__()
        self.weights_path = Path(weights_path)
        self.weights_sha256 = file_sha256(self.weights_path)
        self.settings = dict(settings or {})

    @property
    def published(self) -> bool:
        """True only for the network a metric's published name (FID, KID) refers to."""
        return False

    def provenance(self) -> dict:
        """What the features depend on: the network, its weights file and hash, and preprocessing settings."""
        return {"backend": self.name, "weights": str(self.weights_path), "weights_sha256": self.weights_sha256,
                "feature_dim": self.feature_dim, **self.settings}

    def train(self, mode: bool = True):
        # a feature network is a fixed measuring instrument: no dropout, no batch-norm updates, ever
        return super().train(False)

    def freeze(self) -> FeatureBackend:
        self.requires_grad_(False)
        return self.eval()

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # (N, C, H, W) in [0, 1] -> (N, D)
        raise NotImplementedError
