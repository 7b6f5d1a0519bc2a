"""Small things a new user sees: the progress bar, warnings after a resume, `--help`, the run directory's files in
the README, `make train` run again, the data loader's workers, what a failed start removes, and which run the
evaluation notebook picks by default."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import time
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import ROOT, compose_config
from hydra.errors import InstantiationException
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.demos.boring_classes import BoringModel
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from ldm.callbacks.progress import StepProgressBar
from ldm.commands import unfinished
from ldm.evaluation.newest import newest_evaluable_run
from ldm.utils import config as config_module
from ldm.utils.checkpoint import PREVIOUS
from ldm.utils.errors import NewRunDir, remove_new_run_dir, user_error_cause
from ldm.utils.quiet import silence_known_warnings

pytestmark = pytest.mark.usefixtures("one_thread")


class ShortEpochs(BoringModel):
    """Lightning's test model with epochs of 8 batches, so a run of a few steps spans several epochs."""

    def train_dataloader(self) -> DataLoader:
        return DataLoader(torch.randn(8, 32), batch_size=1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch).sum()


def tiny_trainer(tmp_path: Path, max_steps: int, **options) -> L.Trainer:
    settings = dict(max_steps=max_steps, max_epochs=-1, limit_val_batches=0, logger=False, enable_checkpointing=False,
                    enable_model_summary=False, accelerator="cpu", default_root_dir=str(tmp_path))
    return L.Trainer(**{**settings, **options})


def test_the_terminal_bar_counts_the_runs_steps_across_epochs(tmp_path):
    """Lightning's own bar reads "Epoch 2/-2 ... 4/8" here; the project's reads the step of the run."""
    shown = {}
    for bar_type in (StepProgressBar, RichProgressBar):
        out = io.StringIO()
        bar = bar_type(console_kwargs={"file": out, "force_terminal": True, "width": 120, "color_system": None})
        tiny_trainer(tmp_path, 20, callbacks=[bar]).fit(ShortEpochs())
        shown[bar_type] = out.getvalue().split("\r")[-1]
    assert re.search(r"step 20/20 .* 20/20", shown[StepProgressBar]), shown[StepProgressBar]
    assert "Epoch" not in shown[StepProgressBar]
    assert "Epoch 2/-2" in shown[RichProgressBar]  # what it replaces


def test_a_resumed_run_does_not_warn_that_its_data_loader_is_not_resumable(tmp_path):
    """The data position is in the checkpoint (the DataModule's state) and ldm/data/order.py continues the epoch
    exactly; Lightning's warning looks at the DataLoader only, and is silenced by name (ldm/utils/quiet.py)."""
    checkpoint = tmp_path / "mid_epoch.ckpt"
    trainer = tiny_trainer(tmp_path, 3, enable_progress_bar=False)
    trainer.fit(ShortEpochs())  # ends mid-epoch (3 of 8 batches)
    trainer.save_checkpoint(checkpoint)
    seen = {}
    for quiet in (False, True):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if quiet:
                silence_known_warnings()
            tiny_trainer(tmp_path, 5, enable_progress_bar=False).fit(ShortEpochs(), ckpt_path=checkpoint)
        seen[quiet] = [str(w.message) for w in caught if "dataloader is not resumable" in str(w.message)]
    assert seen[False], "Lightning no longer warns: the filter in ldm/utils/quiet.py can go"
    assert seen[True] == []


def test_help_names_the_usage_the_main_keys_and_every_group():
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), "--help"], capture_output=True, text=True,
                            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert text.startswith("usage: python train.py [group=option ...] [key=value ...]")
    for key in ("seed=0", "resume=auto", "init_from=RUN_DIR", "hydra.run.dir=DIR", "trainer.max_steps=2000",
                "trainer.val_check_interval=500", "data.batch_size=128", "optimizer.lr=0.0005"):
        assert key in text, key
    for group in (path.name for path in (ROOT / "conf").iterdir() if path.is_dir() and path.name != "hydra"):
        assert re.search(rf"^{group}: ", text, re.MULTILINE), group
    assert "--cfg job" in text


def test_the_readme_names_every_file_a_run_directory_holds():
    from ldm.run.loggers import WANDB_ID_FILE

    readme = (ROOT / "README.md").read_text()
    layout = readme[readme.index("    runs/2026-11-22/10-00-00/"):]
    layout = layout[:layout.index("\n\n")]
    # train.log: Hydra's log file, named after the job (train.py)
    for name in (".hydra/config.yaml", "overrides.yaml", "train.log", "last.ckpt", PREVIOUS, "best-step=N.ckpt",
                 "samples/", "wandb/", WANDB_ID_FILE):
        assert name in layout, name


def checkpoint_at(run_dir: Path, step: int, overrides: list[str], max_steps: int = 100) -> Path:
    (run_dir / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(overrides), run_dir / ".hydra" / "overrides.yaml")
    OmegaConf.save(OmegaConf.create({"trainer": {"max_steps": max_steps}}), run_dir / ".hydra" / "config.yaml")
    if step is not None:
        (run_dir / "checkpoints").mkdir()
        torch.save({"state_dict": {}, "global_step": step}, run_dir / "checkpoints" / "last.ckpt")
    return run_dir


def test_make_train_continues_the_newest_unfinished_run_with_the_same_arguments(tmp_path):
    runs = tmp_path / "runs"
    older = checkpoint_at(runs / "2026-01-01" / "09-00-00", 40, [])
    assert unfinished.unfinished_run(runs, []) == (older, 40, 100)
    checkpoint_at(runs / "2026-01-01" / "10-00-00", 60, ["model.depth=3"])  # other arguments: another experiment
    assert unfinished.unfinished_run(runs, []) == (older, 40, 100)
    assert unfinished.unfinished_run(runs, ["model.depth=3"])[1] == 60
    checkpoint_at(runs / "2026-01-02" / "08-00-00", None, [])  # killed before its first checkpoint: passed over
    assert unfinished.unfinished_run(runs, []) == (older, 40, 100)
    checkpoint_at(runs / "2026-01-02" / "09-00-00", 100, [])  # the newest one finished: a new run starts
    assert unfinished.unfinished_run(runs, []) is None


def test_make_train_passes_the_unfinished_run_to_train_py(tmp_path, monkeypatch, capsys):
    run = checkpoint_at(tmp_path / "runs" / "2026-01-01" / "09-00-00", 40, ["trainer.max_steps=100"])
    monkeypatch.setenv("LDM_ROOT", str(tmp_path))
    unfinished.main(["trainer.max_steps=100"])
    printed = capsys.readouterr()
    assert printed.out.strip() == f"hydra.run.dir={run}"
    assert f"continuing {run}, which stopped at step 40 of 100" in printed.err
    unfinished.main(["trainer.max_steps=100", f"hydra.run.dir={tmp_path}/other"])  # a directory is given
    assert capsys.readouterr().out == ""
    recipe = re.search(r"^train: .*\n((?:\t.*\n)+)", (ROOT / "Makefile").read_text(), re.MULTILINE).group(1)
    assert "$$($(PY) -m ldm.commands.unfinished $(ARGS))" in recipe


def test_image_folders_load_with_a_worker_per_core_but_one(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(6)), raising=False)
    assert config_module.loader_workers() == 5 and config_module.loader_workers(4) == 4
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert config_module.loader_workers() == 0  # one core: load in the main process
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(3)), raising=False)
    assert compose_config(["data=folder"]).data.num_workers == 2
    assert compose_config(["data=imagenet"]).data.num_workers == 2


def test_a_failed_start_removes_the_folders_it_made_for_its_run(tmp_path):
    run = tmp_path / "runs" / "2026-01-01" / "10-00-00"
    new = NewRunDir(run, tmp_path / "runs")
    (run / ".hydra").mkdir(parents=True)
    remove_new_run_dir(new)
    assert list(tmp_path.iterdir()) == []
    other = tmp_path / "runs" / "2026-01-01" / "09-00-00"  # another run made meanwhile in the same day's folder
    (run / ".hydra").mkdir(parents=True)
    other.mkdir()
    remove_new_run_dir(new)
    assert not run.exists() and other.is_dir()


def test_a_setting_lightning_refuses_when_the_trainer_starts_is_a_user_error():
    """The config check catches the ones it knows; anything else Lightning refuses is one `error:` line too."""
    refused = MisconfigurationException("`Timer(duration='x')` is not a valid duration")
    try:
        raise InstantiationException("Error in call to target 'lightning.pytorch.trainer.trainer.Trainer'") \
            from refused
    except InstantiationException as wrapped:
        assert user_error_cause(wrapped) is refused
    assert user_error_cause(RuntimeError("a bug")) is None


def fake_run(run_dir: Path, changes: dict, checkpoint: bool = True) -> Path:
    cfg = OmegaConf.merge(compose_config([]), changes)
    (run_dir / ".hydra").mkdir(parents=True)
    OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml", resolve=False)
    if checkpoint:
        (run_dir / "checkpoints").mkdir()
        (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"a checkpoint")
    return run_dir


def test_the_notebook_picks_the_newest_run_it_can_score(tmp_path):
    runs = tmp_path / "runs"
    sweep_job = fake_run(runs / "multirun" / "2026-01-01" / "08-00-00" / "1", {})
    assert newest_evaluable_run(runs) == sweep_job
    digits = fake_run(runs / "2026-01-01" / "09-00-00", {})
    later = time.time_ns() + 10**9
    os.utime(digits / "checkpoints" / "last.ckpt", ns=(later, later))  # newer than the sweep job's
    assert newest_evaluable_run(runs) == digits
    fake_run(runs / "2026-01-02" / "autoencoder", {"task": "autoencoder"})
    fake_run(runs / "2026-01-02" / "folder", {"data": {"train": {"_target_": "ldm.data.folder.FolderDataset"}}})
    fake_run(runs / "2026-01-02" / "unfinished", {}, checkpoint=False)
    for newer in (runs / "2026-01-02").glob("*/checkpoints/last.ckpt"):
        os.utime(newer, ns=(later + 10**9, later + 10**9))
    assert newest_evaluable_run(runs) == digits
    assert newest_evaluable_run(tmp_path / "nothing") is None
