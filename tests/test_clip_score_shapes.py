"""`clip_score_shapes`: the CLIP-score formula in the shipped shapes classifier's attribute space."""

from __future__ import annotations

import pytest
import torch

from ldm.data.shapes import ShapesDataset
from ldm.metrics.suite import build_suite


def score(images, captions) -> float:
    suite = build_suite("shapes", metrics=["fd", "clip_score"])
    suite.update(images, real=True)
    suite.update(images, real=False, captions=captions)
    return suite.compute()["clip_score_shapes"]


def test_real_shapes_score_high_with_their_captions_and_low_with_others():
    val = ShapesDataset("val", num_samples=300)
    images = torch.stack([val[i]["image"] for i in range(len(val))])
    captions = [val.caption(i) for i in range(len(val))]
    own = score(images, captions)
    shuffled = score(images, captions[1:] + captions[:1])
    print(f"clip_score_shapes: own captions {own:.1f}, another image's {shuffled:.1f}")
    assert own > 90 and shuffled < own - 25


def test_score_of_a_hand_worked_case(monkeypatch):
    """Certain of shape and color, half-sure of size; position not asked (its block uniform on both sides)."""
    suite = build_suite("shapes", metrics=["fd", "clip_score"])
    backend = suite.backend
    heads = backend.heads
    caption = "a small red circle"
    asked = {name: int(value) for name, value in ((n, backend.targets(captions=[caption])[n][0]) for n in heads)}
    assert asked["position"] == -1 and min(asked[n] for n in ("shape", "color", "size")) >= 0

    def logits(images):
        out = {}
        for name, classes in heads.items():
            p = torch.full((len(images), classes), 1.0 / classes)
            if name in ("shape", "color"):
                p = torch.nn.functional.one_hot(torch.full((len(images),), asked[name]), classes).float()
            elif name == "size":
                p = torch.full((len(images), classes), 0.5 / (classes - 1))
                p[:, asked[name]] = 0.5
            out[name] = p.clamp_min(1e-12).log()
        return out

    monkeypatch.setattr(backend, "classify", logits)
    image, text = backend.text_alignment(torch.zeros(1, 3, 32, 32), None, [caption])
    k_size, k_pos = heads["size"], heads["position"]
    dot = 1 + 1 + 0.5 + k_pos * (1 / k_pos) ** 2
    image_norm = (1 + 1 + 0.25 + (k_size - 1) * (0.5 / (k_size - 1)) ** 2 + k_pos / k_pos**2) ** 0.5
    text_norm = (1 + 1 + 1 + k_pos / k_pos**2) ** 0.5
    expected = 100 * dot / (image_norm * text_norm)
    assert 100 * torch.nn.functional.cosine_similarity(image, text).item() == pytest.approx(expected, rel=1e-5)
