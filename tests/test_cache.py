"""The offline cache: same losses as encoding every step, keyed by encoders, data content and format, storing
only what is deterministic (a flip as both variants), and training without opening an image."""

from __future__ import annotations

from pathlib import Path

import hydra
import numpy as np
import PIL.Image
import pytest
import torch
from conftest import compose_config
from torch.utils.data import Dataset

from ldm.autoencoders.identity import IdentityAutoencoder
from ldm.conditioners import Conditioner
from ldm.conditioners.embedder import Embedder
from ldm.data import cache as data_cache
from ldm.data.cache import cached_dataset, data_identity
from ldm.data.folder import FolderDataset
from ldm.run.build import build_diffusion

TEXT = ["experiment=shapes_text", "data.train.num_samples=96", "data.val.num_samples=32", "model.depth=1"]


def _setup(overrides, tmp_path, cache: bool, batch_size: int = 32):
    cfg = compose_config(overrides + [f"data.cache={cache}", f"data.cache_dir={tmp_path / 'cache'}",
                                      f"data.batch_size={batch_size}"], tmp_path)
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


# ---- folder data: content in the key, flips as both variants, no image opened ----------------------

def _write_folder(root: Path, count: int = 12, size: int = 16) -> Path:
    """Images whose left and right halves differ (so a flip shows), each with a caption file beside it."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        pixels = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
        pixels[:, : size // 2] = 255
        PIL.Image.fromarray(pixels).save(root / f"{i:02d}.png")
        (root / f"{i:02d}.txt").write_text(f"picture {i}")
    return root


def _pixel_cache(dataset, cache_dir, split="train"):
    """The cache with the identity autoencoder: its latent_mean is the image itself."""
    return cached_dataset(dataset, split, {"root": str(dataset.root)}, IdentityAutoencoder(3), Conditioner(),
                          cache_dir, batch_size=4)


def test_training_from_the_cache_never_opens_an_image(tmp_path, monkeypatch):
    folder = [f"root={_write_folder(tmp_path / 'images')}", "data=folder", "data.image_size=16", "data.flip=true",
              "data.num_workers=0", "data.val_fraction=0.25", "autoencoder=kl_shapes",
              "conditioner=clip_text_random", "model.depth=1"]
    cfg, module, _ = _setup(folder, tmp_path, cache=True, batch_size=4)  # builds the cache
    datamodule = hydra.utils.instantiate(cfg.data)  # a later run: lists the folder, then reads the cache

    def refuse(*args, **kwargs):
        raise AssertionError(f"an image was opened while training from the cache: {args}")

    monkeypatch.setattr(PIL.Image, "open", refuse)
    datamodule.attach_cache(module.autoencoder, module.conditioner, data_identity(cfg.data))
    module.measure_latent_stats(datamodule.train_dataloader(), max_batches=2)
    module.train()
    for batch in datamodule.train_dataloader():
        assert "image" not in batch and len(batch["caption"]) == 4
        assert torch.isfinite(module.training_step(batch, 0))
    module.eval()
    for index, batch in enumerate(datamodule.val_dataloader()):
        module.validation_step(batch, index)
    conditions, count = datamodule.grid_conditions(per_row=2)
    assert count == 3 and all(caption.startswith("picture") for caption in conditions["caption"])


def test_flip_is_cached_as_both_variants(tmp_path):
    root = _write_folder(tmp_path / "images", count=4)
    train = FolderDataset(str(root), "train", image_size=16, val_fraction=0.0, flip=True)
    cached = _pixel_cache(train, tmp_path / "cache")
    plain = torch.stack([train.without_augmentation()[i]["image"] for i in range(len(train))])
    stored = cached.tensors["latent_mean"]  # (N, variants, C, H, W)
    assert stored.shape == (4, 2, 3, 16, 16)
    torch.testing.assert_close(stored[:, 0], plain, rtol=0, atol=0)
    torch.testing.assert_close(stored[:, 1], plain.flip(-1), rtol=0, atol=0)
    # each step draws one of the two for each item
    torch.manual_seed(0)
    lefts = {float(cached[0]["latent_mean"][0, 0, 0]) for _ in range(30)}
    assert lefts == {float(plain[0, 0, 0, 0]), float(plain[0, 0, 0, -1])}
    # the validation split is never flipped: one variant
    val = FolderDataset(str(root), "val", image_size=16, val_fraction=0.5, flip=True)
    assert _pixel_cache(val, tmp_path / "cache", "val").tensors["latent_mean"].shape[1] == 1


class _Augmented(Dataset):
    """Two items whose random transforms are declared (`augmentations`) or not."""

    def __init__(self, augmentations: dict[str, bool], random_image: bool = False):
        self.augmentations, self.random_image = augmentations, random_image

    def __len__(self) -> int:
        return 2

    def without_augmentation(self) -> _Augmented:
        return self

    def metadata(self, i: int) -> dict:
        return {"label": i}

    def __getitem__(self, i: int) -> dict:
        image = torch.rand(3, 4, 4) if self.random_image else torch.full((3, 4, 4), float(i))
        return {"image": image, **self.metadata(i)}


def _cache_of(dataset, tmp_path):
    return cached_dataset(dataset, "train", {}, IdentityAutoencoder(3), Conditioner(), tmp_path, batch_size=2)


def test_random_augmentation_with_the_cache_is_refused_naming_its_key(tmp_path):
    with pytest.raises(ValueError, match=r"data\.crop is a random augmentation.*data\.cache=false"):
        _cache_of(_Augmented({"flip": True, "crop": True}), tmp_path)
    assert _cache_of(_Augmented({"flip": True, "crop": False}), tmp_path).num_variants == 2
    with pytest.raises(ValueError, match="different image under different random seeds"):
        _cache_of(_Augmented({}, random_image=True), tmp_path / "undeclared")


def test_a_changed_folder_builds_a_new_cache(tmp_path):
    root, cache_dir = _write_folder(tmp_path / "images", count=4), tmp_path / "cache"

    def build():
        dataset = FolderDataset(str(root), "train", image_size=16, val_fraction=0.0)
        _pixel_cache(dataset, cache_dir)
        return {p.name for p in cache_dir.glob("*.safetensors")}

    files = build()
    assert build() == files  # nothing changed: read, not rebuilt
    changes = {
        "caption edited": lambda: (root / "01.txt").write_text("another caption"),
        "image replaced": lambda: PIL.Image.new("RGB", (16, 16), (9, 9, 9)).save(root / "02.png"),
        "file added": lambda: (PIL.Image.new("RGB", (16, 16)).save(root / "09.png"),
                               (root / "09.txt").write_text("new")),
    }
    for change, apply in changes.items():
        apply()
        now = build()
        assert len(now) == len(files) + 1, f"{change}: the old cache was reused"
        files = now


def test_the_cache_format_is_in_the_key(tmp_path, monkeypatch):
    dataset = _Augmented({})
    _cache_of(dataset, tmp_path)
    monkeypatch.setattr(data_cache, "CACHE_FORMAT", data_cache.CACHE_FORMAT + 1)
    _cache_of(dataset, tmp_path)
    assert len(list(tmp_path.glob("*.safetensors"))) == 2


class _LeftColumn(Embedder):
    """A frozen image embedder whose output changes under a flip: the image's left column."""

    def __init__(self):
        super().__init__(input_key="image", fields="vector", trainable=False)

    def forward(self, images):
        return {"vector": images[..., 0].flatten(1)}


def test_an_image_embedder_is_cached_per_variant_and_drawn_with_the_latent(tmp_path):
    root = _write_folder(tmp_path / "images", count=4, size=8)
    train = FolderDataset(str(root), "train", image_size=8, val_fraction=0.0, flip=True)
    conditioner = Conditioner([_LeftColumn()], vector_dim=3 * 8)
    cached = cached_dataset(train, "train", {}, IdentityAutoencoder(3), conditioner, tmp_path, batch_size=4)
    assert cached.tensors["cond.0.vector"].shape == (4, 2, 24)
    torch.manual_seed(0)
    drawn = set()
    for _ in range(20):
        item = cached[1]
        torch.testing.assert_close(item["cond.0.vector"], item["latent_mean"][..., 0].flatten(), rtol=0, atol=0)
        drawn.add(float(item["latent_mean"][0, 0, 0]))
    assert len(drawn) == 2
