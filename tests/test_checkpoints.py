"""What a run's checkpoints hold: raw and EMA weights correctly labelled, no frozen parts, last.ckpt at
every validation; and which weights validation, sampling and the final grid use."""

from __future__ import annotations

import csv

import pytest
import torch
from conftest import TINY, compose_config, train_run
from probes import Crash, RecordWeights

from ldm.commands.train import train
from ldm.run.load import load_run
from ldm.utils.checkpoint import CheckpointError, load_checkpoint

SHORT = TINY + ["logger=csv", "trainer.max_steps=30", "trainer.val_check_interval=10", "callbacks.sample_grid=null"]
RECORD = ["+callbacks.record._target_=probes.RecordWeights"]


def _val_losses(run_dir) -> list[float]:
    rows = csv.DictReader(open(run_dir / "csv" / "version_0" / "metrics.csv"))
    return [float(r["val/loss"]) for r in rows if r.get("val/loss")]


def test_before_the_ema_starts_everything_uses_the_raw_weights(tmp_path):
    train_run(SHORT + RECORD + ["callbacks.ema.update_starting_at_step=1000"], tmp_path)
    losses = _val_losses(tmp_path)
    assert len(losses) == 3 and len(set(losses)) == 3, f"validation did not see training progress: {losses}"
    checkpoint = load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert "ema_state_dict" not in checkpoint
    _, module = load_run(tmp_path, trusted=["probes.RecordWeights"])
    for name, raw in RecordWeights.last.items():
        torch.testing.assert_close(dict(module.named_parameters())[name].detach(), raw, rtol=0, atol=0)
    assert module.denoiser.final_layer.linear.weight.abs().max() > 0  # not the zero-initialized output layer


def test_checkpoints_hold_raw_weights_and_the_ema_apart(tmp_path):
    # stops between validations, so last.ckpt is written after fit; TINY: EMA from step 0, decay 0.9
    train_run(SHORT + RECORD + ["trainer.max_steps=25"], tmp_path)
    checkpoint = load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    raw, average = checkpoint["state_dict"], checkpoint["ema_state_dict"]
    assert set(average) == set(RecordWeights.last)  # the EMA covers exactly the trainable parameters
    for name, value in RecordWeights.last.items():
        torch.testing.assert_close(raw[name], value, rtol=0, atol=0)  # raw: where training stopped
    assert any(not torch.equal(raw[name], average[name]) for name in average)
    _, module = load_run(tmp_path, trusted=["probes.RecordWeights"])  # sampling uses the average
    for name, value in average.items():
        torch.testing.assert_close(dict(module.named_parameters())[name].detach(), value, rtol=0, atol=0)


def test_frozen_parts_are_referenced_by_hash_not_stored(trained_run):
    checkpoint = load_checkpoint(trained_run / "checkpoints" / "last.ckpt")
    assert not [k for k in checkpoint["state_dict"] if k.startswith("autoencoder.")]
    assert set(checkpoint["frozen_parts"]) == {"autoencoder"}
    cfg, module = load_run(trained_run)
    with torch.no_grad():
        next(module.autoencoder.parameters()).add_(1e-3)
    module._fingerprints = None
    with pytest.raises(CheckpointError, match="autoencoder"):
        module.load_checkpoint(checkpoint)


def test_a_random_frozen_text_tower_is_rebuilt_identically(tmp_path):
    from ldm.run.build import build_diffusion
    from ldm.utils.fingerprint import module_fingerprint

    cfg = compose_config(["experiment=shapes_text", "model.depth=1"], tmp_path)
    towers = []
    for draws in (0, 100):
        torch.rand(draws)  # whatever the global random stream did before
        towers.append(module_fingerprint(build_diffusion(cfg).conditioner.embedders[0]))
    assert towers[0] == towers[1]


def test_last_checkpoint_moves_at_every_validation_whatever_the_metric(tmp_path):
    # mode=max: the falling loss never "improves", so only the first validation is the best
    overrides = SHORT + ["callbacks.model_checkpoint.mode=max", "trainer.max_steps=40"]
    with pytest.raises(Crash):
        train(compose_config(overrides + ["+callbacks.crash._target_=probes.CrashAt", "+callbacks.crash.step=35"],
                             tmp_path))
    assert load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")["global_step"] == 30
    assert [p.name for p in (tmp_path / "checkpoints").glob("best-*.ckpt")] == ["best-step=10.ckpt"]


def test_last_checkpoint_is_written_when_training_stops_between_validations(tmp_path):
    train(compose_config(SHORT + ["trainer.max_steps=25"], tmp_path))
    assert load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")["global_step"] == 25
