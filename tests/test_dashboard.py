"""The dashboard of a short default-like training with logger=wandb (offline), read back from the run's `.wandb`
file: loss per noise-level bin, throughput, gradient norm, sample metrics and the sample grid; each number checked
against a computation of its own (the loss from the checkpoint, the metrics by evaluate.py, FLOPs by counting)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import TINY, compose_config, train_run
from omegaconf import OmegaConf
from PIL import Image
from wandb_log import history_with

BINS = [f"val/loss_t{b / 10:.1f}-{(b + 1) / 10:.1f}" for b in range(10)]
SHORT = TINY + ["logger=wandb", "trainer.max_steps=20", "trainer.val_check_interval=10", "trainer.log_every_n_steps=5",
                "callbacks.sample_metrics.num_samples=32", "callbacks.throughput.window=5",
                "callbacks.sample_metrics.metrics_overrides=['metrics.kid_subsets=5']"]


@pytest.fixture(scope="module")
def dashboard(tmp_path_factory):
    """The run directory and every logged row (conftest keeps wandb offline)."""
    run_dir = tmp_path_factory.mktemp("dashboard")
    train_run(SHORT, run_dir)
    [log] = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    return run_dir, history_with(log, BINS[-1], at_least=2)


def last(rows: list[dict], key: str):
    values = [row[key] for row in rows if key in row]
    assert values, f"{key} was never logged"
    return values[-1]


def test_loss_per_noise_level_is_the_checkpoint_loss_of_a_fixed_batch_in_each_bin(dashboard):
    """Recomputed from last.ckpt (EMA weights, as validation uses) with the schedule's two rows, bin by bin."""
    from ldm.data.digits import DigitsDataset
    from ldm.run.load import load_run

    run_dir, rows = dashboard
    assert sum(BINS[0] in row for row in rows) == 2  # at both validations
    _, module = load_run(run_dir)
    schedule = module.schedule
    n = OmegaConf.load(run_dir / ".hydra" / "config.yaml").callbacks.noise_levels.batch_size
    images = DigitsDataset("val").images[:n]
    labels = DigitsDataset("val").labels[:n]
    with torch.no_grad():
        z0 = (module.autoencoder.encode(images, sample=False) - module.latent_shift) * module.latent_scale
        noise = torch.randn(z0.shape, generator=torch.Generator().manual_seed(0))
        cond = module.conditioner({"label": labels})
        for b, name in enumerate(BINS):
            t = (b + (torch.arange(n) + 0.5) / n) / 10
            alpha, sigma = (v.view(-1, 1, 1, 1) for v in schedule.alpha_sigma(t))
            x_t = alpha * z0 + sigma * noise
            x_in, t_in = schedule.model_input(x_t, t)
            error = (module.denoiser(x_in, t_in, cond) - schedule.target(z0, noise, t)).pow(2).flatten(1).mean(1)
            expected = (schedule.loss_weight(t) * error).mean().item()
            # validation ran under bf16 autocast (the default on this CPU), the recomputation in float32
            assert last(rows, name) == pytest.approx(expected, rel=1e-3), name


def test_sample_metrics_are_those_evaluate_py_gives_for_the_checkpoint(dashboard, tmp_path):
    from ldm.commands.evaluate import evaluate

    run_dir, rows = dashboard
    cfg = compose_config([f"run={run_dir}", "n=32", "metrics=digits", "metrics.kid_subsets=5", "wandb.mode=disabled",
                          f"metrics.cache_dir={tmp_path}", "steps=null"], tmp_path / "eval", name="evaluate")
    expected = evaluate(cfg)
    assert sum("val/fd_digits" in row for row in rows) == 2
    for name, value in expected.items():
        assert last(rows, f"val/{name}") == pytest.approx(value, rel=1e-5, abs=1e-9), name
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["provenance"]["checkpoint_step"] == 20


def test_throughput_counts_forward_and_backward_flops_per_image(dashboard):
    from torch.utils.flop_counter import FlopCounterMode

    from ldm.run.load import load_run

    run_dir, rows = dashboard
    images_per_sec, flops_per_sec = last(rows, "train/images_per_sec"), last(rows, "train/flops_per_sec")
    assert images_per_sec > 0
    _, module = load_run(run_dir)
    z = torch.zeros(1, *module.latent_shape)
    with torch.no_grad(), FlopCounterMode(display=False) as forward:
        module.denoiser(z, torch.full((1,), 0.5), module.conditioner({"label": torch.tensor([3])}))
    # a training step of one image: the forward pass, and a backward pass of about twice its cost
    ratio = flops_per_sec / images_per_sec / forward.get_total_flops()
    assert 2.5 < ratio < 3.5, ratio


def test_gradient_norm_and_sample_grid_are_logged(dashboard):
    run_dir, rows = dashboard
    norms = [row["train/grad_norm"] for row in rows if "train/grad_norm" in row]
    assert len(norms) >= 3 and all(np.isfinite(norms)) and min(norms) > 0
    grids = [row for row in rows if row.get("samples/_type") == "images/separated"]
    assert grids, "no sample grid was logged"
    [log] = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    with Image.open(log.parent / "files" / grids[-1]["samples/filenames"][0]) as image:
        assert np.asarray(image).std() > 0


@pytest.mark.slow
def test_text_runs_log_a_table_of_prompts_and_images(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    train_run(TINY + ["experiment=shapes_text", "data.cache=false", "model.hidden_size=64", "logger=wandb",
                      "data.train.num_samples=256", "data.val.num_samples=64", "trainer.max_steps=4",
                      "trainer.val_check_interval=4", "callbacks.sample_metrics.num_samples=8",
                      "callbacks.sample_metrics.prompt_table=4", "callbacks.sample_metrics.reference=val"], tmp_path)
    [log] = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    rows = history_with(log, "val/prompts/_type")
    assert last(rows, "val/prompts/_type") == "table-file"
    assert 0 <= last(rows, "val/accuracy_shapes") <= 1
