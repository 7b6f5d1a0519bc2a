"""ImageNet-style class folders (`root/train/n01440764/*.JPEG`) with DiT's preprocessing.

Labels are the index of the image's class folder among the sorted folders of `root/train`, for
both splits, so a class has the same label in each. Images are center-cropped as ADM and DiT do
(`center_crop_arr`): halve with a BOX filter while the short side is at least twice the size, resize
BICUBIC so the short side is the size, then crop the center square.
"""

from __future__ import annotations

import copy
import hashlib
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ldm.data.folder import IMAGE_EXTENSIONS
from ldm.utils.errors import UserError


def center_crop(image: Image.Image, size: int) -> Image.Image:
    """The centered size x size square, after BOX halvings and a BICUBIC resize of the short side to `size`."""
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(side // 2 for side in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(side * scale) for side in image.size), resample=Image.BICUBIC)
    left, top = (image.width - size) // 2, (image.height - size) // 2
    return image.crop((left, top, left + size, top + size))


def to_tensor(image: Image.Image) -> torch.Tensor:
    """(3, H, W) float32 in [-1, 1] from an RGB image (x / 127.5 - 1, as DiT's Normalize(0.5, 0.5) gives)."""
    array = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)
    return array.float() / 127.5 - 1.0


def class_folders(root: Path) -> list[str]:
    """The sorted class folder names of `root/train` (their positions are the labels)."""
    train = root / "train"
    if not train.is_dir():
        raise UserError(f"data.root={root} has no train/ folder: data=imagenet reads root/train/<class>/<image> "
                        "(and root/val/<class>/<image>), one folder per class, as ImageNet's train set comes")
    classes = sorted(entry.name for entry in os.scandir(train) if entry.is_dir())
    if not classes:
        raise UserError(f"{train} has no class folders: put each class's images in its own folder, "
                        f"e.g. {train}/n01440764/*.JPEG")
    return classes


def find_images(folder: Path, classes: list[str]) -> list[tuple[str, int, int, int]]:
    """(path relative to `folder`, label, size, mtime) of every image in the class folders, sorted by path."""
    known = set(classes)
    unknown = sorted(entry.name for entry in os.scandir(folder) if entry.is_dir() and entry.name not in known)
    if unknown:
        raise UserError(f"{folder} has class folders that {folder.parent}/train lacks, e.g. {unknown[0]}: both "
                        "splits need the same classes (one folder per class)")
    items = []
    for label, name in enumerate(classes):
        if not (folder / name).is_dir():
            continue  # a split may miss a class (a small validation set)
        for entry in os.scandir(folder / name):
            if entry.is_file() and entry.name.lower().endswith(IMAGE_EXTENSIONS):
                stat = entry.stat()
                items.append((f"{name}/{entry.name}", label, stat.st_size, stat.st_mtime_ns))
    return sorted(items)


class ImageNetDataset(Dataset):
    """Items: `image` (3, S, S) in [-1, 1] and `label`; `flip` (train split only) mirrors at random."""

    item_keys = ("image", "label")

    def __init__(self, root: str, split: str = "train", image_size: int = 256, flip: bool = True,
                 num_classes: int | None = None):
        if root is None:
            raise UserError("data=imagenet needs the folder that holds train/ (and val/): add root=DIR")
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got '{split}'")
        self.root = Path(root).expanduser()
        self.folder = self.root / split
        if not self.folder.is_dir():
            raise UserError(f"data.root={root} has no {split}/ folder: data=imagenet reads "
                            f"root/{split}/<class>/<image>")
        self.classes = class_folders(self.root)
        if num_classes is not None and len(self.classes) > num_classes:
            raise UserError(f"{self.root}/train has {len(self.classes)} class folders, more than "
                            f"data.num_classes={num_classes}: use data.num_classes={len(self.classes)}")
        self.items = find_images(self.folder, self.classes)
        if not self.items:
            raise UserError(f"no images in the class folders of {self.folder}: data=imagenet reads "
                            f"{self.folder}/<class>/<image> ({', '.join(IMAGE_EXTENSIONS)}); ImageNet's val/ comes "
                            "as one flat folder, sort it into class folders first")
        self.image_size = image_size
        self.flip = bool(flip) and split == "train"

    @property
    def augmentations(self) -> dict[str, bool]:
        """Random augmentations by their data-config key, and whether each is on (the cache stores both flips)."""
        return {"flip": self.flip}

    def without_augmentation(self) -> ImageNetDataset:
        plain = copy.copy(self)
        plain.flip = False
        return plain

    def content_fingerprint(self) -> str:
        """Hash of every image's path, size, modification time and label (the cache key uses it)."""
        digest = hashlib.sha256()
        for path, label, size, mtime in self.items:
            digest.update(f"{path}\0{label}\0{size}\0{mtime}\0".encode())
        return digest.hexdigest()

    def __len__(self) -> int:
        return len(self.items)

    def metadata(self, i: int) -> dict:
        """The item without its image (what training from the cache reads)."""
        return {"label": self.items[i][1]}

    def load(self, i: int) -> Image.Image:
        path = self.folder / self.items[i][0]
        try:
            with Image.open(path) as image:
                return image.convert("RGB")
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            raise OSError(f"cannot read image {path} (missing, corrupt or not an image): {err}") from err

    def __getitem__(self, i: int) -> dict:
        image = center_crop(self.load(i), self.image_size)
        if self.flip and torch.rand(()) < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        return {"image": to_tensor(image), **self.metadata(i)}
