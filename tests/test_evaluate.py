"""Sample metrics: the digits classifier, and the CLI that picks an evaluation by a sample file's content."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ldm.data.digits import DigitsDataset
from ldm.data.shapes import ShapesDataset
from ldm.evaluate import evaluate_file
from ldm.evaluation.digits import digits_accuracy, real_digits_accuracy
from ldm.images import to_uint8


def test_classifier_recognizes_real_held_out_digits():
    assert real_digits_accuracy() > 0.97


def test_sample_file_scoring_and_chance_level(tmp_path):
    val = DigitsDataset("val")
    images = to_uint8(val.images)  # the npz layout: uint8 N x H x W x 1
    labels = val.labels.numpy()
    np.savez(tmp_path / "real.npz", images=images, labels=labels)
    assert evaluate_file(str(tmp_path / "real.npz"))["accuracy"] > 0.97
    shuffled = np.random.default_rng(0).permutation(labels)
    assert digits_accuracy(images, shuffled) < 0.25


def test_unconditional_samples_cannot_be_scored(tmp_path):
    np.savez(tmp_path / "u.npz", images=np.zeros((2, 32, 32, 1), np.uint8), labels=np.full(2, -1))
    with pytest.raises(ValueError, match="unconditional"):
        evaluate_file(str(tmp_path / "u.npz"))


def test_prompted_samples_are_judged_as_shapes(tmp_path):
    items = [ShapesDataset("val", num_samples=8)[i] for i in range(8)]
    images = to_uint8(torch.stack([item["image"] for item in items]))
    captions = [item["caption"] for item in items]
    np.savez(tmp_path / "real.npz", images=images, prompts=np.array(captions))
    assert evaluate_file(str(tmp_path / "real.npz")) == {"color": 1.0, "position": 1.0, "both": 1.0, "n": 8}
    np.savez(tmp_path / "wrong.npz", images=images, prompts=np.array(captions[1:] + captions[:1]))
    assert evaluate_file(str(tmp_path / "wrong.npz"))["both"] < 1.0


def test_file_of_unknown_content_is_refused(tmp_path):
    np.savez(tmp_path / "x.npz", images=np.zeros((2, 32, 32, 1), np.uint8))
    with pytest.raises(ValueError, match="neither `prompts` nor `labels`"):
        evaluate_file(str(tmp_path / "x.npz"))
