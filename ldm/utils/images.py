"""Image grids: tensors in [-1, 1] to uint8 arrays and PNG files, and logging them to any logger."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image


def to_uint8(images: torch.Tensor | np.ndarray) -> np.ndarray:
    """(N, C, H, W) in [-1, 1], tensor or array -> (N, H, W, C) uint8."""
    x = ((torch.as_tensor(images).detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def make_grid(images: np.ndarray, nrow: int, pad: int = 2) -> np.ndarray:
    """(N, H, W, C) uint8 -> one (rows * H, nrow * W, C) image, `nrow` images per row."""
    n, h, w, c = images.shape
    rows = -(-n // nrow)
    grid = np.zeros((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), dtype=np.uint8)
    for i, image in enumerate(images):
        r, col = divmod(i, nrow)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        grid[top:top + h, left:left + w] = image
    return grid


def save_png(array: np.ndarray, path: str | Path, upscale: int = 1) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
    if upscale > 1:
        image = image.resize((image.width * upscale, image.height * upscale), Image.NEAREST)
    image.save(path)
    return path


def log_image(logger, key: str, path: Path, step: int) -> None:
    """Log a saved PNG to whichever loggers can show images (wandb, tensorboard)."""
    if logger is None:
        return
    if hasattr(logger, "log_image"):  # WandbLogger
        logger.log_image(key=key, images=[str(path)], step=step)
    elif hasattr(getattr(logger, "experiment", None), "add_image"):  # TensorBoardLogger
        logger.experiment.add_image(key, np.asarray(Image.open(path).convert("RGB")), step, dataformats="HWC")
