"""Judge generated shapes images from their pixels: is the shape of the asked color, at the asked place?"""

from __future__ import annotations

import numpy as np

from ldm.data.shapes import BACKGROUND, PALETTE, POSITION_CENTERS, parse_caption

# RGB distance from the background above which a pixel belongs to the shape; the palette is >= 150 away
FOREGROUND_THRESHOLD = 75.0


def foreground_mask(images: np.ndarray) -> np.ndarray:
    """(N, H, W) bool: pixels that differ clearly from the plain background."""
    return np.linalg.norm(images.astype(np.float32) - BACKGROUND, axis=-1) > FOREGROUND_THRESHOLD


def judge(images: np.ndarray) -> dict[str, np.ndarray]:
    """Per image: `color` (majority of foreground pixels' nearest palette colors) and `position`
    (foreground centroid's nearest position center); -1 where an image has no foreground."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
    n, height, width, _ = images.shape
    mask = foreground_mask(images)
    colors = np.full(n, -1)
    positions = np.full(n, -1)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5
    for i in range(n):
        if not mask[i].any():
            continue
        shape_pixels = images[i][mask[i]].astype(np.float32)  # (P, 3)
        nearest = np.linalg.norm(shape_pixels[:, None] - PALETTE, axis=-1).argmin(axis=-1)
        colors[i] = np.bincount(nearest, minlength=len(PALETTE)).argmax()
        centroid = np.array([xs[mask[i]].mean() / width, ys[mask[i]].mean() / height])
        positions[i] = np.linalg.norm(POSITION_CENTERS - centroid, axis=-1).argmin()
    return {"color": colors, "position": positions}


def evaluate(images: np.ndarray, color=None, position=None, captions: list[str] | None = None
             ) -> dict[str, float]:
    """Accuracy of `color`, `position` and `both`, against the requested attribute indices or the
    attributes parsed from `captions`."""
    if captions is not None:
        parsed = [parse_caption(c) for c in captions]
        color = [p["color"] for p in parsed]
        position = [p["position"] for p in parsed]
    if color is None or position is None:
        raise ValueError("give the requested attributes: color and position, or captions")
    color, position = np.asarray(color), np.asarray(position)
    if not len(images) == len(color) == len(position):
        raise ValueError(f"{len(images)} images but {len(color)} colors and {len(position)} positions")
    judged = judge(images)
    color_ok = judged["color"] == color
    position_ok = judged["position"] == position
    return {"color": float(color_ok.mean()), "position": float(position_ok.mean()),
            "both": float((color_ok & position_ok).mean())}


def evaluate_samples(samples) -> dict[str, float]:
    """Scores a sample file's `images` against the attributes its `prompts` ask for (the npz of sample.py)."""
    prompts = [str(prompt) for prompt in samples["prompts"]]
    return {**evaluate(samples["images"], captions=prompts), "n": len(prompts)}
