"""Loggers: wandb (offline, read back from its transaction log), tensorboard, csv, and none."""

from __future__ import annotations

import numpy as np
from conftest import TINY, compose_config
from PIL import Image
from wandb_log import history_with

from ldm.commands.train import train

SHORT = TINY + ["trainer.max_steps=20", "trainer.val_check_interval=10", "trainer.log_every_n_steps=5"]


def test_wandb_offline_run_reads_back(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    train(compose_config(SHORT + ["logger=wandb"], tmp_path))
    logs = list(tmp_path.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(logs) == 1, logs
    rows = history_with(logs[0], "train/loss", at_least=3)
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert len(losses) >= 3 and all(np.isfinite(losses)), (logs[0].stat().st_size, rows[:3])
    assert any("val/loss" in r for r in rows)
    images = [r for r in rows if r.get("samples/_type") == "images/separated"]
    assert images, "no sample grid was logged"
    png = logs[0].parent / "files" / images[-1]["samples/filenames"][0]
    with Image.open(png) as image:
        assert image.size == (images[-1]["samples/width"], images[-1]["samples/height"])
        assert np.asarray(image).std() > 0  # a real picture, not a blank


def test_tensorboard_logs_scalars_and_images(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(compose_config(SHORT + ["logger=tensorboard"], tmp_path))
    events = EventAccumulator(str(next(tmp_path.glob("tensorboard/version_*")))).Reload()
    assert "train/loss" in events.Tags()["scalars"]
    assert "samples" in events.Tags()["images"]


def test_no_logger_still_checkpoints(tmp_path):
    train(compose_config(SHORT + ["logger=none"], tmp_path))
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    assert (tmp_path / "samples" / "final.png").is_file()


def test_a_resumed_run_continues_the_same_wandb_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    train(compose_config(SHORT + ["logger=wandb"], tmp_path))
    train(compose_config(SHORT + ["logger=wandb", "trainer.max_steps=30"], tmp_path))
    logs = sorted(tmp_path.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(logs) == 2 and logs[0].name == logs[1].name, logs  # run-<id>.wandb: one id for both parts
    steps = [r["trainer/global_step"] for r in history_with(logs[1], "train/loss") if "train/loss" in r]
    assert steps and min(steps) > 19, steps  # the second part starts after the first one's last step
