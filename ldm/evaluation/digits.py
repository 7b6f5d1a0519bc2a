"""Digits: a classifier trained only on real digits (the training split) labels each sample; the score
is how often it agrees with the label that was asked for."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from ldm.data.digits import load_digits_8x8, split_indices, to_model_range


def to_digit_features(images: np.ndarray | torch.Tensor) -> np.ndarray:
    """uint8 (N, H, W, 1) or float (N, 1, H, W) in [-1, 1] -> (N, 64) features in [0, 16] on the 8x8 grid."""
    x = torch.as_tensor(images)
    if x.dtype == torch.uint8:
        x = x.permute(0, 3, 1, 2).float() / 127.5 - 1.0
    if x.shape[1] != 1:
        raise ValueError(f"digit images have one channel, got shape {tuple(x.shape)}")
    x = F.adaptive_avg_pool2d(x.float(), 8)
    return ((x + 1.0) * 8.0).flatten(1).numpy()


@lru_cache(maxsize=1)
def digits_classifier(image_size: int = 32):
    """An RBF SVM fit on the training split, seen through the same resize round trip as samples."""
    from sklearn.svm import SVC

    images, labels = load_digits_8x8()
    index = split_indices("train")
    features = to_digit_features(to_model_range(images[index], image_size))
    return SVC(C=10.0, gamma="scale").fit(features, labels[index])


def digits_accuracy(images, labels) -> float:
    predicted = digits_classifier().predict(to_digit_features(images))
    return float((predicted == np.asarray(labels)).mean())


def real_digits_accuracy(image_size: int = 32) -> float:
    """The classifier's accuracy on the real validation digits: the ceiling for samples."""
    images, labels = load_digits_8x8()
    index = split_indices("val")
    return digits_accuracy(to_model_range(images[index], image_size), labels[index])


def evaluate_samples(samples, name: str = "the samples") -> dict[str, float]:
    """Scores a sample file's `images` against its `labels` (the npz layout of sample.py)."""
    labels = np.asarray(samples["labels"])
    if (labels < 0).any():
        raise ValueError(f"{name} holds unconditional samples (labels -1): nothing to compare against")
    return {"accuracy": digits_accuracy(samples["images"], labels), "n": len(labels)}
