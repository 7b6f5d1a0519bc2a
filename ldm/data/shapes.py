"""Generated captioned shapes: a colored circle, square or triangle at one of five places (numpy)."""

from __future__ import annotations

import itertools
import re

import numpy as np
import torch
from torch.utils.data import Dataset

SHAPES = ("circle", "square", "triangle")
# well separated in RGB (pairwise distance >= 150) and far from the background
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 60, 230),
    "yellow": (230, 210, 40),
    "magenta": (210, 50, 210),
    "cyan": (40, 210, 210),
    "white": (235, 235, 235),
}
COLOR_NAMES = tuple(COLORS)
PALETTE = np.array(list(COLORS.values()), dtype=np.float32)  # (num_colors, 3)
BACKGROUND = np.array((25, 25, 25), dtype=np.float32)
# centers as fractions (x, y) of the image width and height
POSITIONS = {
    "top left": (0.25, 0.25),
    "top right": (0.75, 0.25),
    "center": (0.5, 0.5),
    "bottom left": (0.25, 0.75),
    "bottom right": (0.75, 0.75),
}
POSITION_NAMES = tuple(POSITIONS)
POSITION_CENTERS = np.array(list(POSITIONS.values()), dtype=np.float32)  # (num_positions, 2)
SIZES = ("small", "large")
# circle radius as a fraction of the image size; large shapes still fit at the corner positions
SIZE_RADIUS = {"small": 0.10, "large": 0.16}
SIZE_JITTER = 0.06  # radius varies by this fraction either way
JITTER = 0.03  # fraction of the image size the center moves either way
SUPERSAMPLE = 4  # subpixels per side, for anti-aliased edges

TEMPLATES = (
    "a {size} {color} {shape} at the {position}",
    "{position}: a {color} {shape}, {size}",
    "there is a {size} {color} {shape} in the {position}",
    "a {color} {shape} in the {position}, {size}",
    "{size} {shape}, {color}, {position}",
    "in the {position} there is a {color} {shape} that is {size}",
    "the {position} holds a {size} {shape} colored {color}",
    "{color} {shape} ({size}) at the {position}",
)
ATTRIBUTES = ("shape", "color", "position", "size")
SPLITS = ("train", "val")


def caption_for(shape: int, color: int, position: int, size: int, template: int) -> str:
    return TEMPLATES[template].format(shape=SHAPES[shape], color=COLOR_NAMES[color],
                                      position=POSITION_NAMES[position], size=SIZES[size])


def _word_pattern(names: tuple[str, ...]) -> re.Pattern:
    return re.compile(r"\b(" + "|".join(sorted(map(re.escape, names), key=len, reverse=True)) + r")\b")


_VOCABULARY = {"shape": SHAPES, "color": COLOR_NAMES, "position": POSITION_NAMES, "size": SIZES}
_PATTERNS = {name: (_word_pattern(words), words) for name, words in _VOCABULARY.items()}


def parse_caption(caption: str) -> dict[str, int]:
    """Attribute indices named in a caption; an attribute that is absent or ambiguous is -1."""
    parsed = {}
    for attribute, (pattern, names) in _PATTERNS.items():
        found = set(pattern.findall(caption.lower()))
        parsed[attribute] = names.index(found.pop()) if len(found) == 1 else -1
    return parsed


def draw(shape: int, color: int, center: tuple[float, float], radius: float, image_size: int) -> np.ndarray:
    """One image (S, S, 3) uint8; `center` (x, y) and `radius` in pixels."""
    n = image_size * SUPERSAMPLE
    coords = (np.arange(n, dtype=np.float32) + 0.5) / SUPERSAMPLE
    dx, dy = coords[None, :] - center[0], coords[:, None] - center[1]
    if SHAPES[shape] == "circle":
        inside = dx**2 + dy**2 <= radius**2
    elif SHAPES[shape] == "square":
        half = radius * 0.886  # the circle's area
        inside = (np.abs(dx) <= half) & (np.abs(dy) <= half)
    else:
        # equilateral, pointing up, its centroid on the center so the position reads the same
        circumradius = radius * 1.25
        angles = np.deg2rad([-90.0, 30.0, 150.0])
        vx, vy = circumradius * np.cos(angles), circumradius * np.sin(angles)
        inside = np.ones((n, n), dtype=bool)
        for k in range(3):
            ax, ay, bx, by = vx[k], vy[k], vx[(k + 1) % 3], vy[(k + 1) % 3]
            inside &= (bx - ax) * (dy - ay) - (by - ay) * (dx - ax) >= 0
    coverage = inside.reshape(image_size, SUPERSAMPLE, image_size, SUPERSAMPLE).mean(axis=(1, 3))[..., None]
    image = BACKGROUND * (1.0 - coverage) + PALETTE[color] * coverage
    return np.round(image).astype(np.uint8)


class ShapesDataset(Dataset):
    """Items: `image` (3, S, S) in [-1, 1], `caption`, and the ints `shape`, `color`, `position`, `size`.

    Every attribute combination appears equally often (within one) in each split, so validation
    captions ask for combinations seen in training; the images themselves differ (see `offsets`).
    """

    def __init__(self, split: str = "train", num_samples: int = 10_000, image_size: int = 32, seed: int = 0):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got '{split}'")
        self.split, self.image_size = split, image_size
        combos = np.array(list(itertools.product(range(len(SHAPES)), range(len(COLORS)),
                                                 range(len(POSITIONS)), range(len(SIZES)))))
        rng = np.random.default_rng([seed, SPLITS.index(split)])
        order = rng.permutation(np.resize(np.arange(len(combos)), num_samples))
        self.attributes = {name: combos[order, k] for k, name in enumerate(ATTRIBUTES)}
        # centers move in whole subpixels, train on offsets (dx + dy) even and val on odd ones, so no
        # validation image can equal a training image while every combination is in both
        steps = max(1, round(JITTER * image_size * SUPERSAMPLE))
        grid = [(dx, dy) for dx in range(-steps, steps + 1) for dy in range(-steps, steps + 1)
                if (dx + dy) % 2 == SPLITS.index(split)]
        self.offsets = np.array(grid)[rng.integers(len(grid), size=num_samples)] / SUPERSAMPLE  # pixels
        self.scales = rng.uniform(1.0 - SIZE_JITTER, 1.0 + SIZE_JITTER, size=num_samples)
        self.templates = rng.integers(len(TEMPLATES), size=num_samples)

    def __len__(self) -> int:
        return len(self.templates)

    def attributes_of(self, i: int) -> dict[str, int]:
        return {name: int(values[i]) for name, values in self.attributes.items()}

    def caption(self, i: int) -> str:
        return caption_for(**self.attributes_of(i), template=int(self.templates[i]))

    def image_uint8(self, i: int) -> np.ndarray:
        """The i-th image as (S, S, 3) uint8, as an evaluator sees generated samples."""
        a = self.attributes_of(i)
        center = POSITION_CENTERS[a["position"]] * self.image_size + self.offsets[i]
        radius = SIZE_RADIUS[SIZES[a["size"]]] * self.image_size * self.scales[i]
        center_xy = (float(center[0]), float(center[1]))
        return draw(a["shape"], a["color"], center_xy, float(radius), self.image_size)

    def metadata(self, i: int) -> dict:
        """The item without its image (what training from the cache reads)."""
        return {"caption": self.caption(i), **self.attributes_of(i)}

    def __getitem__(self, i: int) -> dict:
        image = torch.from_numpy(self.image_uint8(i)).permute(2, 0, 1).float() / 127.5 - 1.0
        return {"image": image, **self.metadata(i)}
