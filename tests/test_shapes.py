"""The generated shapes data set (its judge is the shipped feature network: tests/test_metrics.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import CONF
from hydra.utils import instantiate
from omegaconf import OmegaConf

from ldm.data.shapes import (
    ATTRIBUTES,
    COLORS,
    POSITIONS,
    SHAPES,
    SIZES,
    TEMPLATES,
    ShapesDataset,
    parse_caption,
)
from ldm.utils.images import to_uint8

COUNTS = {"shape": len(SHAPES), "color": len(COLORS), "position": len(POSITIONS), "size": len(SIZES)}


@pytest.fixture(scope="module")
def val() -> ShapesDataset:
    return ShapesDataset("val", num_samples=1000)


@pytest.fixture(scope="module")
def val_images(val) -> np.ndarray:
    return np.stack([val.image_uint8(i) for i in range(len(val))])


def test_item_format(val):
    item = val[0]
    assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32
    assert -1.0 <= item["image"].min() and item["image"].max() <= 1.0
    assert isinstance(item["caption"], str)
    assert all(isinstance(item[name], int) for name in ATTRIBUTES)
    batch = torch.utils.data.default_collate([val[i] for i in range(4)])
    assert batch["image"].shape == (4, 3, 32, 32) and len(batch["caption"]) == 4
    assert batch["color"].dtype == torch.int64


def test_deterministic_by_seed():
    a, b = ShapesDataset("train", 50, seed=3), ShapesDataset("train", 50, seed=3)
    other = ShapesDataset("train", 50)
    for i in range(5):
        assert torch.equal(a[i]["image"], b[i]["image"]) and a.caption(i) == b.caption(i)
    assert any(not torch.equal(a[i]["image"], other[i]["image"]) for i in range(5))


def test_splits_are_disjoint_but_share_combinations(val_images, val):
    train = ShapesDataset("train", num_samples=2000)
    train_images = {train.image_uint8(i).tobytes() for i in range(len(train))}
    assert not train_images & {image.tobytes() for image in val_images}

    def combinations(dataset):
        return set(zip(*(dataset.attributes[name].tolist() for name in ATTRIBUTES), strict=True))

    assert combinations(val) == combinations(train)
    assert len(combinations(val)) == np.prod(list(COUNTS.values()))


def test_captions_parse_back_to_the_attributes(val):
    templates = set()
    for i in range(len(val)):
        assert parse_caption(val.caption(i)) == val.attributes_of(i), val.caption(i)
        templates.add(int(val.templates[i]))
    assert templates == set(range(len(TEMPLATES)))
    first_words = {val.caption(i).split()[0] for i in range(len(val))}
    assert len(first_words) >= 5  # word order varies


def test_every_attribute_value_present(val):
    for name, count in COUNTS.items():
        assert set(val.attributes[name].tolist()) == set(range(count))


def test_model_range_samples_convert_back(val_images, val):
    batch = torch.stack([val[i]["image"] for i in range(8)])
    assert np.array_equal(to_uint8(batch), val_images[:8])


def test_config_builds_the_splits():
    cfg = OmegaConf.create({"data": OmegaConf.load(CONF / "data" / "shapes.yaml")})
    train = instantiate(cfg.data.train, num_samples=10)
    val = instantiate(cfg.data.val, num_samples=10)
    assert (train.split, val.split) == ("train", "val") and train.image_size == cfg.data.image_size == 32
    assert cfg.data.num_classes is None and cfg.data.channels == 3
    assert cfg.data.train.num_samples == 10_000 and cfg.data.val.num_samples == 1000
