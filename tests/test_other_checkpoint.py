"""A checkpoint of another model (`sample.py checkpoint=OTHER.ckpt`, the same in evaluate.py and `resume=`) is
refused with one line naming the first tensor whose shape differs and the config group that sets it, exit 2,
no traceback, and no run directory left behind."""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml
from test_bad_input import assert_refused, run_command

FIXTURE = Path(__file__).parent / "fixtures" / "run_before_layers"  # hidden size 32, depth 1


def test_sampling_with_another_models_checkpoint_names_the_tensor_and_the_key(trained_run, tmp_path):
    result = run_command("sample.py", f"run={FIXTURE}", f"checkpoint={trained_run}/checkpoints/last.ckpt", "n=2",
                         f"out={tmp_path}/x.npz", cwd=tmp_path)
    assert_refused(result, "the checkpoint is of another model than this run's config builds: denoiser.")
    assert "(set by the model.* keys)" in result.stderr and "in the checkpoint and" in result.stderr
    assert not (tmp_path / "x.npz").exists()


def test_evaluating_with_another_models_checkpoint_is_refused_the_same_way(trained_run, tmp_path):
    result = run_command("evaluate.py", f"run={FIXTURE}", f"checkpoint={trained_run}/checkpoints/last.ckpt", "n=2",
                         "wandb.mode=disabled", f"hydra.run.dir={tmp_path}/eval", cwd=tmp_path)
    assert_refused(result, "the checkpoint is of another model than this run's config builds: denoiser.")
    assert not (tmp_path / "eval").exists()


def test_resuming_from_another_models_checkpoint_is_refused_before_training(trained_run, tmp_path):
    run_dir = tmp_path / "new"
    overrides = yaml.safe_load((FIXTURE / ".hydra" / "overrides.yaml").read_text())
    other = tmp_path / "other.ckpt"
    shutil.copy(trained_run / "checkpoints" / "last.ckpt", other)
    result = run_command("train.py", *overrides, f"resume={other}", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert_refused(result, "the checkpoint is of another model than this run's config builds: denoiser.")
    assert not run_dir.exists()
