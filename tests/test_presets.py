"""Presets built from published weights: composing them for sample.py, and class labels by name."""

from __future__ import annotations

import pytest
from conftest import compose_config

from ldm.checks.sampling import sampling_problems
from ldm.commands.sample import requested_conditions
from ldm.run.presets import missing_values, preset_config
from ldm.utils.errors import ConfigError

WEIGHTS = ["dit_weights=/weights/DiT-XL-2-256x256.pt", "vae_weights=/weights/sd-vae-ft-ema"]


def sample_args(*extra: str):
    given = ",".join(repr(item) for item in WEIGHTS)
    return compose_config(["preset=dit_xl2_256", f"preset_overrides=[{given}]", *extra], name="sample")


def test_the_dit_preset_names_the_weights_it_needs():
    assert missing_values(preset_config("dit_xl2_256")) == ["dit_weights", "vae_weights"]
    cfg = preset_config("dit_xl2_256", WEIGHTS)
    assert cfg.model.weights == "/weights/DiT-XL-2-256x256.pt"
    assert cfg.conditioner.embedders[0].weights == cfg.model.weights  # one file fills the DiT and its class table
    assert cfg.model.time_scale == 1.0 and cfg.schedule.time_input == "level" and cfg.model.learn_sigma
    assert cfg.diffusion.scale_factor == pytest.approx(0.18215)  # the SD VAE's published constant
    problems = sampling_problems(compose_config(["preset=dit_xl2_256", "n=2"], name="sample"))
    assert any("preset=dit_xl2_256 needs dit_weights" in line for line in problems)
    with pytest.raises(ConfigError, match="no such experiment"):
        preset_config("dit_xl3")


def test_imagenet_labels_by_name():
    assert sampling_problems(sample_args("labels=[goldfish,207]", "n=4")) == []
    conditions, stored = requested_conditions(sample_args("labels=[goldfish,207]", "n=4"),
                                              preset_config("dit_xl2_256", WEIGHTS))
    assert conditions["label"].tolist() == [1, 207, 1, 207]  # goldfish is ImageNet class 1
    problems = sampling_problems(sample_args("labels=[goldfsh]", "n=1"))
    assert any("'goldfsh' is not a class name (close: goldfish" in line for line in problems)
    problems = sampling_problems(sample_args("labels=[1000]", "n=1"))
    assert any("1000 is not a class of the run" in line for line in problems)
