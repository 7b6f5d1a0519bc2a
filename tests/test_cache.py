"""The offline cache: same losses as encoding every step, rebuilt when an encoder changes, refused when trainable."""

from __future__ import annotations

import hydra
import pytest
import torch
from conftest import compose_config

from ldm.build import build_diffusion
from ldm.data.cache import data_identity

TEXT = ["experiment=shapes_text", "data.train.num_samples=96", "data.val.num_samples=32", "model.depth=1"]


def _setup(overrides, tmp_path, cache: bool):
    cfg = compose_config(overrides + [f"data.cache={cache}", f"data.cache_dir={tmp_path / 'cache'}",
                                      "data.batch_size=32"], tmp_path)
    torch.manual_seed(0)
    module = build_diffusion(cfg)
    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.attach_cache(module.autoencoder, module.conditioner, data_identity(cfg.data))
    return cfg, module, datamodule


def _first_batch(datamodule):
    torch.manual_seed(1)  # the same shuffle for both
    return next(iter(datamodule.train_dataloader()))


@pytest.mark.parametrize("overrides", [["data=digits"], TEXT], ids=["digits", "shapes_text"])
def test_cached_training_gives_the_same_losses(overrides, tmp_path):
    losses = {}
    for cache in (False, True):
        _, module, datamodule = _setup(overrides, tmp_path, cache)
        module.train()
        batch = _first_batch(datamodule)
        assert ("image" in batch) != cache and ("latent_mean" in batch) == cache
        torch.manual_seed(2)  # the same posterior draw, condition dropout, noise and t
        losses[cache] = [module.training_step(batch, 0).item() for _ in range(3)]
    assert losses[True] == pytest.approx(losses[False], rel=1e-4, abs=1e-6)


def _cache_files(tmp_path):
    return sorted(p.name for p in (tmp_path / "cache").glob("*.safetensors"))


def test_cache_is_reused_and_rebuilt_when_an_encoder_changes(tmp_path):
    cfg, module, datamodule = _setup(TEXT, tmp_path, cache=True)
    first = _cache_files(tmp_path)
    assert len(first) == 2  # train and val

    # the same encoders again: the cache is read, not rebuilt
    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.attach_cache(module.autoencoder, module.conditioner, data_identity(cfg.data))
    assert _cache_files(tmp_path) == first

    with torch.no_grad():  # a different autoencoder
        next(module.autoencoder.parameters()).add_(0.01)
    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.attach_cache(module.autoencoder, module.conditioner, data_identity(cfg.data))
    second = _cache_files(tmp_path)
    assert len(second) == 4

    with torch.no_grad():  # a different text encoder
        next(module.conditioner.embedders[0].parameters()).add_(0.01)
    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.attach_cache(module.autoencoder, module.conditioner, data_identity(cfg.data))
    assert len(_cache_files(tmp_path)) == 6


def test_trainable_encoder_with_cache_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="trainable"):
        _setup(TEXT + ["conditioner=clip_text_tiny"], tmp_path, cache=True)
