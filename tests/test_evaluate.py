"""Evaluation (`evaluate.py`, one scoring loop for every image source):
metrics.json with provenance from a run's EMA samples, seeds per sample (same numbers for any batch size or number
of devices), sample files and real images against the reference, an untrained model worse than a trained one,
and the sampler table of a sweep."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from conftest import compose_config, run_script
from forked import run

from ldm.commands.evaluate import evaluate
from ldm.data.digits import DigitsDataset
from ldm.data.shapes import ShapesDataset
from ldm.utils.images import to_uint8

# small and fast: few samples, two sampler steps, few KID subsets; reference statistics in the test's folder
SMALL = ["n=40", "batch_size=16", "steps=2", "metrics=digits", "metrics.kid_subsets=5", "wandb.mode=disabled"]


def evaluation(tmp_path: Path, name: str, *overrides: str) -> dict:
    """evaluate.py's job, run in-process; returns its metrics.json."""
    out = tmp_path / name
    cfg = compose_config([*SMALL, f"metrics.cache_dir={tmp_path / 'cache'}", *overrides], out, name="evaluate")
    scores = evaluate(cfg)
    record = json.loads((out / "metrics.json").read_text())
    assert record["metrics"] == pytest.approx(scores, rel=1e-12)
    return record


# ---- evaluate.py ------------------------------------------------------------------------------------

def test_run_evaluation_writes_metrics_with_provenance_whatever_the_batch_size(trained_run, tmp_path):
    from ldm.evaluation.seeded import sample_seed
    from ldm.run.load import load_run

    # float32 like module.sample below (auto is bf16 autocast on CPUs with bf16 units)
    record = evaluation(tmp_path, "a", f"run={trained_run}", "keep=4", "precision=32-true")
    metrics, provenance = record["metrics"], record["provenance"]
    assert {"fd_digits", "kid_digits", "precision_digits", "recall_digits", "accuracy_digits"} <= set(metrics)
    weights = Path(provenance["weights"])
    assert provenance["weights_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert (provenance["backend"], provenance["n"], provenance["num_fake"], provenance["num_real"]) == (
        "digits", 40, 40, len(DigitsDataset("train")))  # against the training split by default
    assert (provenance["sampler_name"], provenance["steps"], provenance["nfe"], provenance["guidance"]) == (
        "euler", 2, 2, 2.0)  # the run's sampler and sample_guidance
    assert (provenance["seed"], provenance["world_size"], provenance["checkpoint_step"], provenance["ema"]) == (
        0, 1, 60, True)
    # one batch instead of three: sample i comes from seed (0, i) either way
    again = evaluation(tmp_path, "b", f"run={trained_run}", "batch_size=40", "keep=4", "precision=32-true")
    assert again["metrics"] == pytest.approx(metrics, rel=1e-5)
    # ... and is the image that the run's own sampling draws from that seed, one at a time
    _, module = load_run(trained_run)
    from PIL import Image

    grid = np.asarray(Image.open(tmp_path / "a" / "samples.png"))
    for i in range(4):
        expected = to_uint8(module.sample({"label": torch.tensor([i % 10])}, 1, steps=2,
                                          generator=torch.Generator().manual_seed(sample_seed(0, i))))[0, ..., 0]
        top, left = 2 * 2, 2 * (2 + i * 34)  # make_grid's 2-pixel padding, 32-pixel images, saved at 2x
        shown = grid[top:top + 64:2, left:left + 64:2]
        assert np.abs(shown.astype(int) - expected.astype(int)).max() <= 1, f"sample {i}"


def test_evaluation_logs_a_wandb_run_in_the_training_runs_group(trained_run, tmp_path, monkeypatch):
    from wandb_log import records

    monkeypatch.setenv("WANDB_MODE", "offline")
    evaluation(tmp_path, "w", f"run={trained_run}", "n=20", "wandb.mode=null")
    [log] = (tmp_path / "w").glob("wandb/offline-run-*/run-*.wandb")
    runs = [record.run for record in records(log) if record.WhichOneof("record_type") == "run"]
    assert runs and runs[0].run_group == str(trained_run.resolve()) and runs[0].job_type == "evaluate"
    from wandb_log import history_with

    rows = history_with(log, "fd_digits")
    assert any(np.isfinite(row.get("fd_digits", np.nan)) for row in rows)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """The Fréchet distance of Gaussians fitted to two feature sets, with scipy's matrix square root."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real))


def test_sample_file_and_real_images_against_the_reference(tmp_path):
    """The floor: real validation digits scored against the training digits, from a sample file and as `real=val`,
    equals the distance scipy computes from the feature network's features."""
    from ldm.metrics.features import unit_images
    from ldm.metrics.suite import build_suite

    train, val = DigitsDataset("train"), DigitsDataset("val")
    samples = tmp_path / "real.npz"
    np.savez(samples, images=to_uint8(val.images), labels=val.labels.numpy())
    from_file = evaluation(tmp_path, "file", f"samples={samples}", "reference_data=digits")
    backend = build_suite("digits").backend
    with torch.no_grad():
        features = [torch.cat([backend(unit_images(x)) for x in images.split(500)]).double().numpy()
                    for images in (train.images, val.images)]
    expected = frechet_distance(*features)
    assert from_file["metrics"]["fd_digits"] == pytest.approx(expected, rel=1e-6)
    assert from_file["metrics"]["accuracy_digits"] > 0.97
    assert from_file["provenance"]["num_fake"] == len(val) and from_file["provenance"]["reference_split"] == "train"


def test_real_split_scores_like_its_sample_file(trained_run, tmp_path):
    val = DigitsDataset("val")
    samples = tmp_path / "real.npz"
    np.savez(samples, images=to_uint8(val.images[:40]), labels=val.labels[:40].numpy())
    from_file = evaluation(tmp_path, "file", f"samples={samples}", f"run={trained_run}")
    real = evaluation(tmp_path, "real", f"run={trained_run}", "real=val")
    assert real["metrics"] == pytest.approx(from_file["metrics"], rel=1e-9)
    assert real["provenance"]["real"] == "val" and real["provenance"]["n"] == 40


def test_reconstructed_real_split_scores_like_a_file_of_the_autoencoders_reconstructions(trained_run, tmp_path):
    from ldm.run.load import load_run

    _, module = load_run(trained_run)
    val = DigitsDataset("val")
    images = torch.stack([val[i]["image"] for i in range(40)])
    with torch.no_grad():
        rebuilt = module.autoencoder.decode(module.autoencoder.encode(images, sample=False)).clamp(-1, 1)
    samples = tmp_path / "rebuilt.npz"
    np.savez(samples, images=to_uint8(rebuilt), labels=val.labels[:40].numpy())
    from_file = evaluation(tmp_path, "file", f"samples={samples}", f"run={trained_run}")
    through = evaluation(tmp_path, "through", f"run={trained_run}", "real=val", "reconstruct=true")
    plain = evaluation(tmp_path, "plain", f"run={trained_run}", "real=val")
    assert through["metrics"] == pytest.approx(from_file["metrics"], rel=1e-6)
    assert through["metrics"]["fd_digits"] > plain["metrics"]["fd_digits"]
    assert through["provenance"]["reconstructed"] and not plain["provenance"]["reconstructed"]


def test_untrained_weights_score_worse_than_the_trained_run(trained_run, tmp_path):
    trained = evaluation(tmp_path, "trained", f"run={trained_run}")["metrics"]
    untrained = evaluation(tmp_path, "init", f"run={trained_run}", "checkpoint=init")["metrics"]
    print(f"fd_digits: trained {trained['fd_digits']:.3f}, untrained {untrained['fd_digits']:.3f}")
    assert untrained["fd_digits"] > 1.5 * trained["fd_digits"]


def test_a_preset_is_evaluated_without_a_run_directory(tmp_path):
    record = evaluation(tmp_path, "preset", "preset=digits_pixel", "n=20",
                        "preset_overrides=['model.depth=1','model.hidden_size=32','model.num_heads=2']")
    provenance = record["provenance"]
    assert (provenance["preset"], provenance["run"], provenance["checkpoint"]) == ("digits_pixel", None, None)
    assert provenance["data"] == "ldm.data.digits.DigitsDataset" and record["metrics"]["fd_digits"] > 0


def test_bad_arguments_are_named_before_any_work(trained_run, tmp_path):
    from ldm.utils.errors import ConfigError

    cfg = compose_config([f"run={trained_run}", "n=1", "reference=test", "steps=0", "samples=nope.npz",
                          "checkpoint=nope.ckpt"], tmp_path / "bad", name="evaluate")
    with pytest.raises(ConfigError) as caught:
        evaluate(cfg)
    message = str(caught.value)
    for expected in ("n=1 must be at least 2", "reference=test: choose one of train, val", "steps=0 must be at least 1",
                     "samples=nope.npz: no such .npz file", "checkpoint=nope.ckpt: no such file"):
        assert expected in message
    assert not (tmp_path / "bad").exists()


def test_a_sweep_on_several_devices_is_refused_before_any_job(trained_run, tmp_path):

    from conftest import ROOT

    sweep = tmp_path / "sweep"
    result = run("evaluate.py", "-m", f"run={trained_run}", "accelerator=cpu", "devices=2", "steps=2,4",
                 f"hydra.sweep.dir={sweep}", env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "devices=2 (2 devices) in a sweep (-m)" in result.stderr and "devices=1" in result.stderr
    assert not sweep.exists()


@pytest.mark.slow
def test_two_devices_give_the_metrics_of_one(trained_run, tmp_path):
    """Two gloo processes through trainer.predict, each drawing its half of the samples."""
    # KID subsets of half the samples: their choice follows the order of the gathered features
    one = evaluation(tmp_path, "one", f"run={trained_run}", "metrics.kid_subset_size=20")
    common = [f"run={trained_run}", *SMALL, f"metrics.cache_dir={tmp_path / 'cache'}", "metrics.kid_subset_size=20"]
    run_script("evaluate.py", *common, "devices=2", "strategy=ddp", "accelerator=cpu",
               f"hydra.run.dir={tmp_path / 'two'}")
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert two["provenance"]["world_size"] == 2
    assert two["metrics"] == pytest.approx(one["metrics"], rel=1e-6)


@pytest.mark.slow
def test_sweep_gives_the_sampler_table(trained_run, tmp_path):
    from ldm.evaluation.table import collect, format_table, main

    sweep = tmp_path / "sweep"
    run_script("evaluate.py", "-m", f"run={trained_run}", *SMALL, f"metrics.cache_dir={tmp_path / 'cache'}",
               "sampler=euler,heun", "steps=2,4", f"hydra.sweep.dir={sweep}")
    rows = collect(sweep)
    nfe = {(row["label"], row["steps"]): row["nfe"] for row in rows}
    # heun: 2 calls a step but the last
    assert nfe == {("euler", 2): 2, ("euler", 4): 4, ("heun", 2): 3, ("heun", 4): 7}
    print(format_table(rows))
    main([str(sweep), "--no-wandb"])
    assert (sweep / "quality_vs_nfe.png").stat().st_size > 0


# ---- the one digits judge and the one shapes judge, on sample files ------------------------------------

def test_a_sample_file_with_shuffled_labels_scores_chance_accuracy(tmp_path):
    val = DigitsDataset("val")
    shuffled = np.random.default_rng(0).permutation(val.labels.numpy())
    samples = tmp_path / "shuffled.npz"
    np.savez(samples, images=to_uint8(val.images), labels=shuffled)
    assert evaluation(tmp_path, "shuffled", f"samples={samples}", "reference_data=digits",
                      "n=2")["metrics"]["accuracy_digits"] < 0.25


def test_prompted_samples_are_judged_as_shapes(tmp_path):
    items = [ShapesDataset("val", num_samples=64)[i] for i in range(64)]
    images = to_uint8(torch.stack([item["image"] for item in items]))
    captions = [item["caption"] for item in items]
    scores = {}
    for name, prompts in (("right", captions), ("wrong", captions[1:] + captions[:1])):
        np.savez(tmp_path / f"{name}.npz", images=images, prompts=np.array(prompts))
        cfg = compose_config([f"samples={tmp_path / name}.npz", "reference_data=shapes", "wandb.mode=disabled",
                              "metrics=shapes", "metrics.metrics=[accuracy]", f"metrics.cache_dir={tmp_path}"],
                             tmp_path / name, name="evaluate")
        scores[name] = evaluate(cfg)
    assert scores["right"]["accuracy_shapes"] > 0.9
    assert scores["wrong"]["accuracy_shapes"] < scores["right"]["accuracy_shapes"] - 0.3


def test_quality_curves_go_log_scale_when_values_span_more_than_20x():
    import matplotlib

    matplotlib.use("Agg")
    from ldm.evaluation.table import plot_quality_vs_nfe

    def rows(*values):
        return [{"label": "euler", "nfe": 10 * (i + 1), "fd_digits": v} for i, v in enumerate(values)]

    assert plot_quality_vs_nfe(rows(0.3, 0.25, 0.24), "fd_digits").get_yscale() == "linear"
    assert plot_quality_vs_nfe(rows(13.8, 0.25, 0.24), "fd_digits").get_yscale() == "log"


def test_reconstruct_without_a_real_split_is_refused(trained_run, tmp_path):
    from ldm.checks.evaluation import evaluation_problems

    cfg = compose_config([f"run={trained_run}", "reconstruct=true"], tmp_path / "x", name="evaluate")
    assert any(line.startswith("reconstruct=true scores reconstructions") and "real=val" in line
               for line in evaluation_problems(cfg))
    cfg = compose_config([f"run={trained_run}", "reconstruct=true", "real=val"], tmp_path / "x", name="evaluate")
    assert evaluation_problems(cfg) == []
