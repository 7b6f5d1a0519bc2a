"""The app end to end: fast_dev_run of every pairing, a real short training, checkpoints, multirun."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch
from conftest import TINY, compose_config, run_script

from ldm.commands.train import train

SCHEDULES = ("flow", "ddpm", "v", "x0", "edm", "trig")
PAIRINGS = [(m, s, a) for m in ("dit", "unet") for s in SCHEDULES
            for a in ("kl_digits", "identity")]


@pytest.mark.parametrize("model,schedule,autoencoder", PAIRINGS, ids=["-".join(p) for p in PAIRINGS])
def test_fast_dev_run(model, schedule, autoencoder, tmp_path):
    overrides = TINY + [f"model={model}", f"schedule={schedule}", f"autoencoder={autoencoder}", "debug=fdr",
                        "logger=none"]
    if model == "unet":  # the wiring of every pairing, at a width that keeps pixel-space runs short
        overrides = [o for o in overrides if not o.startswith("model.depth")] + ["model.channels=32"]
    if autoencoder == "identity" and model == "dit":
        overrides.append("model.patch_size=4")
    train(compose_config(overrides, tmp_path))


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_any_time_sampler_and_loss_weight_with_any_schedule(schedule, tmp_path):
    overrides = TINY + [f"schedule={schedule}", "schedule/time_sampler=logit_normal", "schedule.loss_weight=min_snr",
                        "debug=fdr", "logger=none"]
    loss = train(compose_config(overrides, tmp_path))
    assert loss is not None and math.isfinite(loss)


def _metric(run_dir: Path, name: str) -> list[float]:
    rows = list(csv.DictReader(open(next(run_dir.glob("csv/version_*/metrics.csv")))))
    return [float(r[name]) for r in rows if r.get(name)]


def test_validation_loss_falls(trained_run):
    val = _metric(trained_run, "val/loss")
    assert len(val) == 3, val
    assert val[-1] < 0.8 * val[0], f"validation loss did not fall: {val}"


def test_run_directory_layout(trained_run):
    assert (trained_run / "checkpoints" / "last.ckpt").is_file()
    assert list((trained_run / "checkpoints").glob("best-*.ckpt"))
    grids = sorted(p.name for p in (trained_run / "samples").glob("*.png"))
    assert "final.png" in grids and "step_000020.png" in grids, grids


def test_multirun_makes_two_run_directories(tmp_path):
    sweep = tmp_path / "sweep"
    run_script("train.py", "-m", "seed=1,2", "debug=fdr", "logger=none", "data.cache=false", "model.depth=1",
               "data.batch_size=16", f"hydra.sweep.dir={sweep}", "trainer.accelerator=cpu")
    runs = sorted(p for p in sweep.iterdir() if p.is_dir() and (p / ".hydra" / "config.yaml").is_file())
    assert [p.name for p in runs] == ["0", "1"]
    seeds = [(p / ".hydra" / "overrides.yaml").read_text() for p in runs]
    assert "seed=1" in seeds[0] and "seed=2" in seeds[1]


def test_autoencoder_stage_trains_and_exports(tmp_path):
    from ldm.autoencoders.kl import KLAutoencoder

    # bf16 with clipping: the fused AdamW, which Lightning's mixed-precision plugin would refuse to clip
    train(compose_config(["experiment=vae_digits", "logger=none", "trainer.max_steps=3", "trainer.val_check_interval=3",
                          "data.batch_size=16", "trainer.accelerator=cpu", "trainer.precision=bf16-mixed",
                          "trainer.gradient_clip_val=1.0"], tmp_path))
    assert list((tmp_path / "samples").glob("recon_*.png"))
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == 3
    assert [group["fused"] for group in checkpoint["optimizer_states"][0]["param_groups"]] == [True]
    exported = KLAutoencoder(channels=16, channel_mult=[1, 2], weights=str(tmp_path / "autoencoder.safetensors"))
    assert exported.latent_shape(32) == (4, 8, 8)
