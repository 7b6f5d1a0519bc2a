"""Captioned images from a folder: an imagefolder-style `metadata.jsonl`, or a `.txt` beside each image."""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms import v2

from ldm.utils.errors import UserError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
METADATA_NAME = "metadata.jsonl"


def _from_metadata(root: Path, caption_key: str) -> list[tuple[Path, str]]:
    """(image, caption) pairs from every metadata.jsonl under root; `file_name` is relative to its file."""
    items = []
    for metadata in sorted(root.rglob(METADATA_NAME)):
        with open(metadata, encoding="utf-8") as lines:
            for number, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                where = f"{metadata}, line {number}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{where} is not valid JSON: {err}") from err
                if "file_name" not in record or caption_key not in record:
                    raise ValueError(f"{where} needs the keys 'file_name' and '{caption_key}', "
                                     f"has {sorted(record)}")
                items.append((metadata.parent / record["file_name"], str(record[caption_key])))
    return items


def _from_text_files(root: Path) -> list[tuple[Path, str]]:
    """(image, caption) pairs from images with a same-named .txt file beside them."""
    images = _image_files(root)
    uncaptioned = [p for p in images if not p.with_suffix(".txt").is_file()]
    if uncaptioned:
        raise FileNotFoundError(f"{len(uncaptioned)} images in {root} have no caption file, e.g. "
                                f"{uncaptioned[0].with_suffix('.txt')} is missing for {uncaptioned[0]}")
    return [(p, p.with_suffix(".txt").read_text(encoding="utf-8").strip()) for p in images]


def _image_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def _examples(paths: list, root: Path, count: int = 3) -> str:
    shown = [str(Path(path).relative_to(root)) if Path(path).is_relative_to(root) else str(path)
             for path in paths[:count]]
    return ", ".join(shown) + (", ..." if len(paths) > count else "")


@functools.lru_cache(maxsize=100_000)
def _image_problem(path: str, size: int, modified_ns: int) -> str | None:
    """Why the file is no readable image (PIL reads its header and checks what it can without decoding),
    else None; remembered per file version, as the train and validation splits scan the same folder."""
    try:
        with Image.open(path) as image:
            image.verify()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        return str(error) or type(error).__name__
    return None


def unreadable_images(paths: list[Path]) -> list[tuple[Path, str]]:
    """(path, reason) of each file that is not an image PIL can read."""
    found = []
    for path in paths:
        stat = path.stat()
        if (problem := _image_problem(str(path), stat.st_size, stat.st_mtime_ns)) is not None:
            found.append((path, problem))
    return found


def find_items(root: str | Path, caption_key: str = "text") -> list[tuple[Path, str]]:
    """All (image path, caption) pairs of a folder, sorted by path.

    Every image file must be used and readable: an image left out of metadata.jsonl, or one PIL cannot read, is
    refused here, when the folder is scanned (before any work), not dropped or found mid-training."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"data.root={root} is not a directory")
    has_metadata = any(root.rglob(METADATA_NAME))
    items = _from_metadata(root, caption_key) if has_metadata else _from_text_files(root)
    if not items:
        raise ValueError(f"no captioned images in {root}: expected {METADATA_NAME} (file_name, "
                         f"{caption_key}) or images with a .txt caption beside each")
    missing = [path for path, _ in items if not path.is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} images listed in {METADATA_NAME} are missing, "
                                f"e.g. {missing[0]}")
    if has_metadata:
        listed = {path.resolve() for path, _ in items}
        unlisted = [path for path in _image_files(root) if path.resolve() not in listed]
        if unlisted:
            raise UserError(f"root={root}: {len(unlisted)} images are not listed in {METADATA_NAME} "
                            f"({_examples(unlisted, root)}), so they have no caption: add a line (file_name, "
                            f"{caption_key}) for each, or move them out of the folder")
    unreadable = unreadable_images([path for path, _ in items])
    if unreadable:
        first, reason = unreadable[0]
        raise UserError(f"root={root}: {len(unreadable)} of {len(items)} images cannot be read "
                        f"({_examples([path for path, _ in unreadable], root)}; {first.name}: {reason}): replace or "
                        "remove them (and their captions)")
    return sorted(items, key=lambda item: str(item[0]))


def split_items(items: list, split: str, val_fraction: float, seed: int = 0) -> list:
    """A fixed validation share: the first ceil(n * val_fraction) of a seeded permutation."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got '{split}'")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    num_val = math.ceil(len(items) * val_fraction)
    order = np.random.default_rng(seed).permutation(len(items))
    chosen = order[:num_val] if split == "val" else order[num_val:]
    return [items[i] for i in sorted(chosen)]


class FolderDataset(Dataset):
    """Items: `image` (3, S, S) in [-1, 1] and `caption`; resized on the shorter side, center-cropped.

    `flip` (train split only) mirrors images at random; it is off by default because captions
    that say "left" or "right" would then lie.
    """

    def __init__(self, root: str, split: str = "train", image_size: int = 64, val_fraction: float = 0.05,
                 flip: bool = False, seed: int = 0, caption_key: str = "text"):
        if root is None:
            raise ValueError("data=folder needs the image folder: add root=DIR (or data.root=DIR)")
        self.root = Path(root).expanduser()
        self.items = split_items(find_items(self.root, caption_key), split, val_fraction, seed)
        self.flip = bool(flip) and split == "train"
        self.transform = v2.Compose([v2.Resize(image_size, antialias=True), v2.CenterCrop(image_size),
                                     v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
                                     v2.Normalize([0.5] * 3, [0.5] * 3)])
        self.random_flip = v2.RandomHorizontalFlip()

    @property
    def augmentations(self) -> dict[str, bool]:
        """Random augmentations by their data-config key, and whether each is on (the cache checks them)."""
        return {"flip": self.flip}

    def without_augmentation(self) -> FolderDataset:
        """The same items, never flipped (the cache stores both variants itself)."""
        plain = copy.copy(self)
        plain.flip = False
        return plain

    def content_fingerprint(self) -> str:
        """Hash of every image's name, size and modification time, and every caption (the cache key uses it)."""
        digest = hashlib.sha256()
        for path, caption in self.items:
            stat = path.stat()
            digest.update(f"{path.relative_to(self.root)}\0{stat.st_size}\0{stat.st_mtime_ns}\0{caption}\0".encode())
        return digest.hexdigest()

    def __len__(self) -> int:
        return len(self.items)

    def load(self, path: Path) -> Image.Image:
        try:
            with Image.open(path) as image:
                return image.convert("RGB")
        except FileNotFoundError as err:
            raise FileNotFoundError(f"image file is missing: {path}") from err
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            raise OSError(f"cannot read image {path} (corrupt or not an image): {err}") from err

    def metadata(self, i: int) -> dict:
        """The item without its image (what training from the cache reads)."""
        return {"caption": self.items[i][1]}

    def __getitem__(self, i: int) -> dict:
        image = self.transform(self.load(self.items[i][0]))
        if self.flip:
            image = self.random_flip(image)
        return {"image": image, **self.metadata(i)}
