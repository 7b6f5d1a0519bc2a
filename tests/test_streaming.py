"""Streamed litdata shards: what they hold, each item once per epoch over ranks and workers, exact mid-epoch
resume, per-epoch order from the seed; `data=imagenet` class folders with DiT's crop, read by a real run."""

from __future__ import annotations

import copy
import csv
import io
import json
import logging
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from conftest import CONF, TINY, compose_config, train_run
from PIL import Image
from probes import Crash
from torch.utils.data import Dataset

from ldm.autoencoders.identity import IdentityAutoencoder
from ldm.autoencoders.kl import KLAutoencoder
from ldm.conditioners import Conditioner
from ldm.data import cache_file
from ldm.data.cache import cached_dataset
from ldm.data.imagenet import ImageNetDataset, center_crop, to_tensor
from ldm.data.shards import shard_cache
from ldm.data.streaming import LatentShards, ResumableLoader, StreamingDataModule
from ldm.utils.checkpoint import load_checkpoint
from ldm.utils.errors import ConfigError
from ldm.utils.files import temporary_name

N, BATCH, WORKERS, RANKS = 512, 16, 2, 2


class Generated(Dataset):
    """Random (4, 8, 8) images fixed by their index, label index % 10; a declared flip, cached as two variants."""

    def __init__(self, n: int = N, flip: bool = True):
        self.n, self.flip = n, flip
        self.loads = [0]  # shared with the unflipped copy the cache encodes

    @property
    def augmentations(self) -> dict[str, bool]:
        return {"flip": self.flip}

    def without_augmentation(self):
        plain = copy.copy(self)
        plain.flip = False
        return plain

    def image(self, i: int) -> torch.Tensor:
        return torch.rand(4, 8, 8, generator=torch.Generator().manual_seed(i)) * 2 - 1

    def __len__(self) -> int:
        return self.n

    def metadata(self, i: int) -> dict:
        return {"label": i % 10}

    def __getitem__(self, i: int) -> dict:
        self.loads[0] += 1
        image = self.image(i)
        if self.flip and torch.rand(()) < 0.5:
            image = image.flip(-1)
        return {"image": image, **self.metadata(i)}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    # 64 KiB chunks: about 8 items each, so ranks and workers split many chunks
    return shard_cache(Generated(), "train", {"name": "generated"}, IdentityAutoencoder(4), Conditioner(),
                       tmp_path_factory.mktemp("cache"), batch_size=64, chunk_bytes=1 << 16)


def loader_for(shards, rank: int, monkeypatch, seed: int = 0, batches_done=None) -> ResumableLoader:
    """Rank `rank` of RANKS, as litdata sees a distributed run (it reads WORLD_SIZE and GLOBAL_RANK)."""
    monkeypatch.setenv("WORLD_SIZE", str(RANKS))
    monkeypatch.setenv("GLOBAL_RANK", str(rank))
    dataset = LatentShards(shards, shuffle=True, seed=seed, drop_last=True)
    return ResumableLoader(dataset, batches_done=batches_done, batch_size=BATCH, num_workers=WORKERS, drop_last=True)


def one_epoch(loader, rank: int, monkeypatch, batches: int | None = None) -> list[dict]:
    """Up to `batches` batches (default: the epoch's length), asking for no more, as Lightning does."""
    monkeypatch.setenv("GLOBAL_RANK", str(rank))
    limit = len(loader) if batches is None else batches
    taken = []
    for batch in loader:
        taken.append(batch)
        if len(taken) == limit:
            break
    return taken


def indices(batches: list[dict]) -> list[int]:
    return [i for batch in batches for i in batch["index"].tolist()]


def assert_same_batches(got: list[dict], expected: list[dict]) -> None:
    assert indices(got) == indices(expected)
    for a, b in zip(got, expected, strict=True):
        assert torch.equal(a["latent_mean"], b["latent_mean"]) and torch.equal(a["label"], b["label"])


def test_items_hold_the_encoded_image_or_one_flip_drawn_anew_every_epoch(shards, monkeypatch):
    reference = Generated()
    loaders = [loader_for(shards, rank, monkeypatch) for rank in range(RANKS)]
    flipped: list[dict[int, bool]] = []
    for _ in range(2):
        flipped.append({})
        for rank, loader in enumerate(loaders):
            for batch in one_epoch(loader, rank, monkeypatch):
                assert batch["latent_mean"].shape == (BATCH, 4, 8, 8) and batch["latent_mean"].dtype == torch.float32
                assert torch.equal(batch["latent_std"], torch.zeros_like(batch["latent_std"]))
                for index, label, latent in zip(batch["index"].tolist(), batch["label"].tolist(), batch["latent_mean"],
                                                 strict=True):
                    image = reference.image(index)
                    assert label == index % 10
                    assert torch.equal(latent, image) or torch.equal(latent, image.flip(-1)), f"item {index}"
                    flipped[-1][index] = torch.equal(latent, image.flip(-1))
    assert 0.4 < np.mean(list(flipped[0].values())) < 0.6
    assert 0.4 < np.mean([flipped[0][i] != flipped[1][i] for i in range(N)]) < 0.6  # a fresh draw each epoch


def test_each_item_once_per_epoch_across_ranks_and_workers(shards, monkeypatch):
    loaders = [loader_for(shards, rank, monkeypatch) for rank in range(RANKS)]
    previous = None
    for _ in range(2):
        seen = [indices(one_epoch(loader, rank, monkeypatch)) for rank, loader in enumerate(loaders)]
        assert [len(s) for s in seen] == [N // RANKS] * RANKS
        assert sorted(seen[0] + seen[1]) == list(range(N))  # every item once, none twice
        assert previous is None or set(seen[0]) != set(previous)  # ranks get other items every epoch
        previous = seen[0]


def test_order_changes_with_the_epoch_and_follows_the_seed(shards, monkeypatch):
    first = loader_for(shards, 0, monkeypatch, seed=0)
    epoch1, epoch2 = (indices(one_epoch(first, 0, monkeypatch)) for _ in range(2))
    again = indices(one_epoch(loader_for(shards, 0, monkeypatch, seed=0), 0, monkeypatch))
    other = indices(one_epoch(loader_for(shards, 0, monkeypatch, seed=1), 0, monkeypatch))
    assert epoch1 != epoch2 and epoch1 == again and epoch1 != other


@pytest.mark.parametrize("rank", range(RANKS))
def test_resume_mid_epoch_repeats_and_skips_nothing(shards, monkeypatch, rank):
    uninterrupted = loader_for(shards, rank, monkeypatch)
    expected = [one_epoch(uninterrupted, rank, monkeypatch) for _ in range(3)]

    done = 3  # an odd count with two workers: the next batch comes from the second worker
    interrupted = loader_for(shards, rank, monkeypatch, batches_done=lambda: done)
    one_epoch(interrupted, rank, monkeypatch)
    # the trainer had fetched one batch more than it trained on when the checkpoint was written
    assert_same_batches(one_epoch(interrupted, rank, monkeypatch, batches=done + 1), expected[1][:done + 1])
    saved = io.BytesIO()
    torch.save(interrupted.state_dict(), saved)
    state = torch.load(io.BytesIO(saved.getvalue()), weights_only=True)  # as checkpoints are read

    resumed = loader_for(shards, rank, monkeypatch)
    resumed.load_state_dict(state)
    rest = one_epoch(resumed, rank, monkeypatch, batches=len(expected[1]) - done)
    assert_same_batches(rest, expected[1][done:])
    assert_same_batches(one_epoch(resumed, rank, monkeypatch), expected[2])  # and the next epoch as it would be


def test_shards_hold_what_the_in_memory_cache_holds(tmp_path, monkeypatch):
    torch.manual_seed(0)
    autoencoder = KLAutoencoder(in_channels=4, latent_channels=3, channels=8, channel_mult=[1, 2]).eval()
    dataset = Generated(64)
    in_memory = cached_dataset(dataset, "train", {"name": "g"}, autoencoder, Conditioner(), tmp_path, batch_size=16)
    streamed = shard_cache(dataset, "train", {"name": "g"}, autoencoder, Conditioner(), tmp_path, batch_size=16)
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("GLOBAL_RANK", "0")
    reader = LatentShards(streamed, shuffle=False)
    reader.variant_keys = ()  # every stored variant, to compare whole items
    stored_order = [reader[position]["index"] for position in range(len(dataset))]
    # written in a shuffled order, so that a chunk mixes classes
    assert sorted(stored_order) == list(range(len(dataset))) and stored_order[:8] != sorted(stored_order[:8])
    for position in range(len(dataset)):
        item = reader[position]
        for key in ("latent_mean", "latent_std"):
            torch.testing.assert_close(item[key], in_memory.tensors[key][item["index"]], rtol=0, atol=0)
        assert item["label"] == item["index"] % 10
    assert item["latent_mean"].shape == (2, 3, 2, 2) and item["latent_std"].abs().min() > 0


def test_shards_are_reused_and_a_truncated_chunk_is_rebuilt(shards, caplog):
    dataset = Generated()
    again = shard_cache(dataset, "train", {"name": "generated"}, IdentityAutoencoder(4), Conditioner(),
                        shards.directory.parent, batch_size=64, chunk_bytes=1 << 16)
    assert again == shards and dataset.loads == [0]
    chunk = sorted(shards.directory.glob("*.bin"))[3]
    chunk.write_bytes(chunk.read_bytes()[:100])
    stale = temporary_name(shards.directory)  # what a killed build leaves
    stale.mkdir()
    (stale / "chunk-0-0.bin").write_bytes(b"half")
    with caplog.at_level(logging.WARNING, logger=cache_file.__name__):
        shard_cache(dataset, "train", {"name": "generated"}, IdentityAutoencoder(4), Conditioner(),
                    shards.directory.parent, batch_size=64, chunk_bytes=1 << 16)
    assert dataset.loads[0] > 0 and "rebuilding the cache" in caplog.text and chunk.name in caplog.text
    assert chunk.stat().st_size > 100
    leftovers = [p.name for p in shards.directory.parent.iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_a_loader_made_mid_run_continues_the_trainer_epoch(shards, monkeypatch):
    # Lightning makes a new loader each epoch when asked to reload them: it must not restart at epoch 1
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("GLOBAL_RANK", "0")
    reference = ResumableLoader(LatentShards(shards, shuffle=True, drop_last=True), batch_size=BATCH, drop_last=True)
    second_epoch = [indices(one_epoch(reference, 0, monkeypatch)) for _ in range(2)][1]
    datamodule = StreamingDataModule(Generated(64), Generated(16), image_size=8, channels=4, batch_size=BATCH)
    datamodule.shards = {"train": shards}

    class Trainer:
        current_epoch, world_size = 1, 1

    datamodule.trainer = Trainer()
    assert indices(one_epoch(datamodule.train_dataloader(), 0, monkeypatch)) == second_epoch


def test_global_batch_size_is_split_over_the_processes():
    datamodule = StreamingDataModule(Generated(64), Generated(16), image_size=8, channels=4, batch_size=7,
                                     global_batch_size=256)

    class Trainer:
        world_size = 8

    datamodule.trainer = Trainer()
    assert datamodule.per_process_batch_size() == 32
    Trainer.world_size = 3
    with pytest.raises(ConfigError, match="global_batch_size=256 does not split evenly over 3"):
        datamodule.per_process_batch_size()
    # a sample grid of 8 classes spread over the 1000, not one row for each
    datamodule.num_classes = 1000
    conditions, n = datamodule.grid_conditions(per_row=2)
    assert n == 16 and conditions["label"].tolist() == [c for c in range(0, 1000, 125) for _ in range(2)]
    with pytest.raises(ConfigError, match="data.cache='disk'"):
        StreamingDataModule(Generated(64), Generated(16), image_size=8, channels=4, cache="disk")


# ---------------------------------------------------------------- data=imagenet

def test_center_crop_halves_with_box_then_resizes_bicubic_then_takes_the_center():
    pixels = np.random.default_rng(0).integers(0, 256, (600, 1000, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    # by hand, for 64: the short side 600 >= 128 halves (BOX) to 300, 150 and 75 (< 128 stops);
    # BICUBIC to a short side of 64 gives 107 x 64 (round(125 * 64 / 75)); the center crop starts at x = 21
    expected = image.resize((500, 300), Image.BOX).resize((250, 150), Image.BOX).resize((125, 75), Image.BOX)
    expected = expected.resize((107, 64), Image.BICUBIC).crop((21, 0, 85, 64))
    assert np.array_equal(np.asarray(center_crop(image, 64)), np.asarray(expected))
    # a tall image smaller than twice the size: no halving, 45 x 99 -> 32 x 70, crop from y = 19
    tall = Image.fromarray(pixels[:99, :45])
    expected = tall.resize((32, 70), Image.BICUBIC).crop((0, 19, 32, 51))
    assert np.array_equal(np.asarray(center_crop(tall, 32)), np.asarray(expected))
    # x / 127.5 - 1, as DiT's ToTensor and Normalize(0.5, 0.5) give
    torch.testing.assert_close(to_tensor(Image.new("RGB", (2, 2), (255, 0, 51)))[:, 0, 0],
                               torch.tensor([1.0, -1.0, -0.6]))


CLASSES = ("n03", "n01", "n02")  # made in this order; labels follow the sorted names


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet")
    rng = np.random.default_rng(0)
    for split, per_class in (("train", 6), ("val", 2)):
        for name in CLASSES:
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                height, width = rng.integers(17, 53, 2)  # odd sizes, either orientation
                pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{name}_{i}.JPEG", quality=95)
    (root / "train" / "n01" / "notes.txt").write_text("not an image")
    return root


def test_imagenet_folders_labels_crop_and_flip(imagenet):
    train = ImageNetDataset(str(imagenet), "train", image_size=16, num_classes=3)
    val = ImageNetDataset(str(imagenet), "val", image_size=16, num_classes=3)
    assert (len(train), len(val)) == (18, 6) and train.classes == ["n01", "n02", "n03"]
    for dataset in (train, val):
        for i, (path, label, _, _) in enumerate(dataset.items):
            assert label == sorted(CLASSES).index(path.split("/")[0]) == dataset.metadata(i)["label"]
    item = val[0]
    assert item["image"].shape == (3, 16, 16) and item["image"].dtype == torch.float32
    with Image.open(imagenet / "val" / val.items[0][0]) as original:
        assert torch.equal(item["image"], to_tensor(center_crop(original.convert("RGB"), 16)))
    assert train.augmentations == {"flip": True} and val.augmentations == {"flip": False}
    with pytest.raises(Exception, match="more than data.num_classes=2"):
        ImageNetDataset(str(imagenet), "train", image_size=16, num_classes=2)


def test_imagenet_shards_store_both_flips_for_training_only(imagenet, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("GLOBAL_RANK", "0")
    for split, variants in (("train", 2), ("val", 1)):
        dataset = ImageNetDataset(str(imagenet), split, image_size=16)
        shards = shard_cache(dataset, split, {"split": split}, IdentityAutoencoder(3), Conditioner(), tmp_path)
        reader = LatentShards(shards, shuffle=False)
        reader.variant_keys = ()
        for position in range(len(dataset)):
            item = reader[position]
            image = dataset.without_augmentation()[item["index"]]["image"]
            assert item["latent_mean"].shape == (variants, 3, 16, 16) and item["label"] == image_label(dataset, item)
            assert torch.equal(item["latent_mean"][0], image)
            if variants == 2:
                assert torch.equal(item["latent_mean"][1], image.flip(-1))


def image_label(dataset, item) -> int:
    return dataset.items[item["index"]][1]


# 18 training images, 4 per batch: 4 batches per epoch; validation (and last.ckpt) every 3 steps
RUN = [o for o in TINY if not o.startswith(("data.", "model.depth"))] + [
    "data=imagenet", "data.image_size=16", "data.num_classes=3", "data.batch_size=4", "data.num_workers=2",
    "autoencoder=identity", "model.depth=1", "model.hidden_size=32", "model.num_heads=2", "logger=csv",
    "trainer.max_steps=8", "trainer.val_check_interval=3", "trainer.log_every_n_steps=1",
    "+trainer.limit_val_batches=1", "callbacks.sample_grid=null", "callbacks.ema.update_starting_at_step=2",
]


def _losses(run_dir) -> dict[int, float]:
    rows = csv.DictReader(open(run_dir / "csv" / "version_0" / "metrics.csv"))
    return {int(r["step"]): float(r["train/loss"]) for r in rows if r.get("train/loss")}


def test_a_run_streams_imagenet_and_resumes_mid_epoch_as_if_uninterrupted(imagenet, tmp_path):
    from ldm.commands.train import train

    run = RUN + [f"root={imagenet}", f"data.cache_dir={tmp_path / 'cache'}"]
    train(compose_config(run, tmp_path / "a"))
    with pytest.raises(Crash):
        train(compose_config(run + ["+callbacks.crash._target_=probes.CrashAt", "+callbacks.crash.step=5"],
                             tmp_path / "b"))
    checkpoint = load_checkpoint(tmp_path / "b" / "checkpoints" / "last.ckpt")
    assert checkpoint["global_step"] == 3  # three of the first epoch's four batches
    assert checkpoint["StreamingDataModule"]["stream"]["num_samples_yielded"] == 3 * 4
    train(compose_config(run, tmp_path / "b"))  # the same command again: resume=auto

    expected, got = _losses(tmp_path / "a"), _losses(tmp_path / "b")
    assert sorted(got) == sorted(expected) and len(got) >= 7
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6), f"step {step}"
    caches = sorted(p.name.split("-")[0] for p in (tmp_path / "cache").glob("*.litdata"))
    assert caches == ["train", "val"]  # built by the first run, reused by the others


class RecordIndices(L.Callback):
    """Appends, per rank, the step and the items of each training batch to `path`/rank{r}.jsonl."""

    def __init__(self, path: str):
        self.path = Path(path)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.path / f"rank{trainer.global_rank}.jsonl", "a") as lines:
            lines.write(json.dumps({"step": trainer.global_step, "world": trainer.world_size,
                                    "items": batch["index"].tolist()}) + "\n")


def recorded(path: Path) -> dict[int, dict[int, list[int]]]:
    """rank -> step -> items."""
    return {rank: {r["step"]: r["items"] for r in map(json.loads, open(path / f"rank{rank}.jsonl"))}
            for rank in range(RANKS)}


@pytest.mark.slow
def test_two_ddp_ranks_stream_each_item_once_per_epoch_and_resume_exactly(imagenet, tmp_path):
    # 18 items, 3 per batch on each of 2 ranks: 3 steps per epoch, every item used; last.ckpt every 2 steps
    run = [o for o in RUN if not o.startswith(("data.batch_size", "trainer.max_steps", "trainer.val_check"))] + [
        "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "data.batch_size=3", "trainer.max_steps=8",
        "trainer.val_check_interval=2", f"root={imagenet}", f"data.cache_dir={tmp_path / 'cache'}"]
    record = ["+callbacks.record._target_=test_streaming.RecordIndices"]
    train_run(run + record + [f"+callbacks.record.path={tmp_path / 'a'}"], tmp_path / "uninterrupted")
    with pytest.raises(Crash):
        train_run(run + ["+callbacks.crash._target_=probes.CrashAt", "+callbacks.crash.step=5"], tmp_path / "run")
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")["global_step"] == 4  # mid-epoch 1
    train_run(run + record + [f"+callbacks.record.path={tmp_path / 'b'}"], tmp_path / "run")

    uninterrupted, resumed = recorded(tmp_path / "a"), recorded(tmp_path / "b")
    for epoch in range(2):
        steps = range(3 * epoch, 3 * epoch + 3)
        items = [i for rank in range(RANKS) for step in steps for i in uninterrupted[rank][step]]
        assert sorted(items) == list(range(18)), f"epoch {epoch}: not each item once over the two ranks"
    for rank in range(RANKS):
        assert sorted(resumed[rank]) == [4, 5, 6, 7]
        assert {step: uninterrupted[rank][step] for step in resumed[rank]} == resumed[rank], f"rank {rank}"


@pytest.mark.slow
def test_twenty_thousand_images_stream_once_per_epoch_resume_exactly_and_in_bounded_memory(tmp_path):
    from ldm.tools.streaming_check import run_check

    report = run_check(tmp_path, items=20_000)
    print(json.dumps(report, indent=2))
    assert report["once_per_epoch"] == [True, True] and report["exact_resume"] == [True] * RANKS
    memory = report["peak_memory"]
    baseline = memory["baseline, 0 workers"]["pss_with_workers"]
    in_memory = memory["memory, 0 workers"]["pss_with_workers"] - baseline
    streamed = memory["stream, 0 workers"]["pss_with_workers"] - baseline
    assert in_memory > 0.8 * report["cache_mib"][next(k for k in report["cache_mib"] if k.endswith(".safetensors"))]
    assert streamed < in_memory / 3, f"streaming took {streamed:.0f} MiB over the baseline, in memory {in_memory:.0f}"


def test_dit_xl2_imagenet256_is_dits_recipe(imagenet):
    from ldm.checks.keys import config_errors

    if not (CONF / "autoencoder" / "sd_vae.yaml").is_file():
        pytest.skip("conf/autoencoder/sd_vae.yaml is not there yet")
    cfg = compose_config(["experiment=dit_xl2_imagenet256", f"root={imagenet}", "autoencoder.weights=/vae"])
    assert config_errors(cfg) == []  # every key is one its target takes
    # the published recipe (Peebles & Xie 2023, and DiT's train.py)
    assert (cfg.model.hidden_size, cfg.model.depth, cfg.model.num_heads, cfg.model.patch_size) == (1152, 28, 16, 2)
    assert (cfg.optimizer.lr, cfg.optimizer.weight_decay, cfg.lr_scheduler.warmup_steps) == (1e-4, 0.0, 0)
    assert cfg.data.global_batch_size == 256 and cfg.data.image_size == 256 and cfg.data.cache == "stream"
    assert cfg.callbacks.ema.decay == 0.9999 and cfg.trainer.max_steps == 400_000
    assert (cfg.schedule.beta_schedule, cfg.schedule.num_timesteps) == ("linear", 1000)
    assert cfg.schedule._target_ == "ldm.schedules.DDPM"
    label = cfg.conditioner.embedders[0]
    assert (label.num_classes, label.drop_rate, cfg.conditioner.vector_dim) == (1000, 0.1, 1152)
    assert cfg.autoencoder.scale_factor == 0.18215 and cfg.autoencoder.latent_channels == 4
