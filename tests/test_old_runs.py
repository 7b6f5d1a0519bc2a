"""A run directory made before the modules moved into their layers (tests/fixtures/run_before_layers: its config
names `ldm.optim.constant` and `ldm.loggers.ContinuedCSVLogger`) still samples and resumes."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch
import yaml
from conftest import run_script

from ldm.run.renamed import MOVED_MODULES, current_target
from ldm.run.trust import load_run_config
from ldm.utils.checkpoint import load_checkpoint

FIXTURE = Path(__file__).parent / "fixtures" / "run_before_layers"


def old_run(tmp_path: Path) -> Path:
    run_dir = tmp_path / "old"
    shutil.copytree(FIXTURE, run_dir)
    return run_dir


def test_the_fixture_names_the_old_module_paths():
    text = (FIXTURE / ".hydra" / "config.yaml").read_text()
    assert "_target_: ldm.optim.constant" in text and "_target_: ldm.loggers.ContinuedCSVLogger" in text


def test_moved_targets_map_to_where_they_live_now():
    assert current_target("ldm.optim.warmup_cosine") == "ldm.tasks.optim.warmup_cosine"
    assert current_target("ldm.hydra_hooks.CheckTrainingConfig") == "ldm.checks.hydra.CheckTrainingConfig"
    assert current_target("ldm.callbacks.ema.EMA") == "ldm.callbacks.ema.EMA"  # not moved
    cfg = load_run_config(FIXTURE / ".hydra" / "config.yaml")
    assert cfg.lr_scheduler._target_ == "ldm.tasks.optim.constant"
    assert cfg.logger.csv._target_ == "ldm.run.loggers.ContinuedCSVLogger"
    assert not any(str(module).startswith(tuple(MOVED_MODULES)) and module not in MOVED_MODULES.values()
                   for module in MOVED_MODULES.values())  # no new path is itself an old one


def test_an_old_run_directory_samples(tmp_path):
    run_dir = old_run(tmp_path)
    out = tmp_path / "samples.npz"
    run_script("sample.py", f"run={run_dir}", "n=4", "steps=2", f"out={out}")
    samples = np.load(out)
    assert samples["images"].shape == (4, 32, 32, 1) and samples["images"].std() > 0


def test_an_old_run_directory_resumes_from_its_checkpoint(tmp_path):
    run_dir = old_run(tmp_path)
    before = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    overrides = yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text())
    overrides = [item for item in overrides if not item.startswith("trainer.max_steps=")]
    # the DiT's defaults have changed since (position layout, time frequency shift): the run keeps its own,
    # given as the refusal to continue with the new ones says
    run_script("train.py", *overrides, "model.pos_embed_layout=row_cos_sin", "model.time_frequency_shift=0",
               "trainer.max_steps=6", f"hydra.run.dir={run_dir}")
    after = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    assert (before["global_step"], after["global_step"]) == (4, 6)
    moved = [name for name, value in before["state_dict"].items()
             if not torch.equal(value, after["state_dict"][name])]
    assert moved, "the resumed run did not train"
    assert after["ema_state_dict"].keys() == before["ema_state_dict"].keys()
    rows = (run_dir / "csv" / "version_0" / "metrics.csv").read_text()
    assert "val/loss" in rows.splitlines()[0]
