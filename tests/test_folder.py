"""Captioned image folders: both caption layouts, the split, and errors that name the bad file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CONF
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image

from ldm.data.folder import FolderDataset
from ldm.utils.errors import UserError


def write_image(path: Path, size=(40, 24), color=(255, 0, 0)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


@pytest.fixture
def metadata_folder(tmp_path) -> Path:
    records = []
    for i in range(5):
        write_image(tmp_path / "images" / f"{i}.png", color=(50 * i, 0, 255))
        records.append({"file_name": f"images/{i}.png", "text": f"picture number {i}"})
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return tmp_path


@pytest.fixture
def text_folder(tmp_path) -> Path:
    for i in range(4):
        write_image(tmp_path / f"img{i}.jpg", size=(20, 30), color=(0, 60 * i, 0))
        (tmp_path / f"img{i}.txt").write_text(f"caption {i}\n")
    return tmp_path


def test_metadata_layout(metadata_folder):
    train = FolderDataset(str(metadata_folder), "train", image_size=16, val_fraction=0.2)
    val = FolderDataset(str(metadata_folder), "val", image_size=16, val_fraction=0.2)
    assert (len(train), len(val)) == (4, 1)
    item = val[0]
    assert item["image"].shape == (3, 16, 16) and item["image"].dtype == torch.float32
    number = int(item["caption"].split()[-1])
    # a solid (50 * number, 0, 255) image maps to [-1, 1] exactly
    expected = torch.tensor([50 * number, 0, 255]) / 127.5 - 1
    torch.testing.assert_close(item["image"][:, 8, 8], expected.float())
    captions = {train[i]["caption"] for i in range(len(train))} | {item["caption"]}
    assert captions == {f"picture number {i}" for i in range(5)}


def test_text_layout_resizes_the_shorter_side_and_crops(text_folder):
    dataset = FolderDataset(str(text_folder), "train", image_size=8, val_fraction=0.0)
    assert len(dataset) == 4 and dataset[0]["caption"] == "caption 0"
    assert dataset[2]["image"].shape == (3, 8, 8)
    # a gray-scale file comes out RGB
    Image.new("L", (10, 10), 128).save(text_folder / "img0.jpg")
    assert dataset[0]["image"].shape == (3, 8, 8)


def test_split_is_deterministic_and_disjoint(tmp_path):
    for i in range(20):
        write_image(tmp_path / f"{i:02d}.png", size=(4, 4))
        (tmp_path / f"{i:02d}.txt").write_text(str(i))
    train = FolderDataset(str(tmp_path), "train", image_size=4, val_fraction=0.25)
    val = FolderDataset(str(tmp_path), "val", image_size=4, val_fraction=0.25)
    again = FolderDataset(str(tmp_path), "val", image_size=4, val_fraction=0.25)
    train_paths, val_paths = {p for p, _ in train.items}, {p for p, _ in val.items}
    assert len(val_paths) == 5 and not train_paths & val_paths and len(train_paths | val_paths) == 20
    assert val.items == again.items


def test_flip_only_in_train(tmp_path):
    image = np.zeros((8, 8, 3), dtype=np.uint8)
    image[:, :4] = 255  # left half white
    Image.fromarray(image).save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("white on the left")
    torch.manual_seed(0)
    train = FolderDataset(str(tmp_path), "train", image_size=8, val_fraction=0.0, flip=True)
    lefts = {float(train[0]["image"][0, 0, 0]) for _ in range(30)}
    assert lefts == {-1.0, 1.0}
    val = FolderDataset(str(tmp_path), "val", image_size=8, val_fraction=0.5, flip=True)
    assert len(val) == 1 and all(float(val[0]["image"][0, 0, 0]) == 1.0 for _ in range(10))


def test_corrupt_file_is_named(metadata_folder):
    """Refused when the folder is scanned; a file damaged after that is named when it is read."""
    dataset = FolderDataset(str(metadata_folder), "train", image_size=16, val_fraction=0.0)
    (metadata_folder / "images" / "3.png").write_bytes(b"this is not a png at all")
    with pytest.raises(UserError, match=r"1 of 5 images cannot be read \(images/3\.png; 3\.png: cannot identify"):
        FolderDataset(str(metadata_folder), "train", image_size=16, val_fraction=0.0)
    index = [p.name for p, _ in dataset.items].index("3.png")
    with pytest.raises(OSError, match=r"images/3\.png"):
        dataset[index]


def test_missing_file_is_named(metadata_folder):
    (metadata_folder / "images" / "2.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"images/2\.png"):
        FolderDataset(str(metadata_folder), "train", image_size=16)


def test_missing_caption_file_is_named(text_folder):
    (text_folder / "img1.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"img1\.txt"):
        FolderDataset(str(text_folder), "train", image_size=16)


def test_bad_metadata_line_is_named(metadata_folder):
    with open(metadata_folder / "metadata.jsonl", "a") as f:
        f.write('{"file_name": "images/0.png"}\n')
    with pytest.raises(ValueError, match=r"metadata\.jsonl, line 6.*'text'"):
        FolderDataset(str(metadata_folder), "train", image_size=16)


def test_config_reads_data_root(metadata_folder):
    cfg = OmegaConf.create({"data": OmegaConf.load(CONF / "data" / "folder.yaml")})
    cfg.data.root = str(metadata_folder)
    cfg.data.image_size = 16
    train, val = instantiate(cfg.data.train), instantiate(cfg.data.val)
    assert len(train) + len(val) == 5 and len(val) == 1
    assert train[0]["image"].shape == (3, 16, 16)
