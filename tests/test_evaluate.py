"""The digits metric: a classifier trained only on real digits, applied to sample files."""

from __future__ import annotations

import numpy as np
import pytest

from ldm.data.digits import DigitsDataset
from ldm.evaluate import digits_accuracy, evaluate_file, real_digits_accuracy
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
