"""Files from elsewhere are data: a crafted checkpoint or run-directory config that tries to create a
file is refused by sampling and resume with a message naming what is wrong, and the file never appears."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import CONF, TINY, run_script
from omegaconf import OmegaConf

from ldm.run.load import load_run
from ldm.run.trust import UntrustedConfig, check_run_config, target_problem
from ldm.utils.checkpoint import CheckpointError, load_checkpoint

# the overrides of conftest's `trained_run`, so train.py accepts its directory as the same run
TRAINED = TINY + ["logger=csv", "trainer.max_steps=60", "trainer.val_check_interval=20"]


class CreatesFile:
    """Unpickling this (without weights_only) runs `touch MARKER`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def crafted_checkpoint(path: Path, marker: Path) -> Path:
    torch.save({"state_dict": {}, "global_step": 1, "payload": CreatesFile(marker)}, path)
    return path


def copy_run(run: Path, to: Path) -> Path:
    shutil.copytree(run, to, ignore=shutil.ignore_patterns("csv", "samples"))
    return to


def edit_run_config(run_dir: Path, edit) -> None:
    path = run_dir / ".hydra" / "config.yaml"
    cfg = yaml.safe_load(path.read_text())
    edit(cfg)
    path.write_text(yaml.safe_dump(cfg))


# ---- the allow-list itself ----------------------------------------------------------------------

def test_every_shipped_config_passes_the_check():
    """Targets and resolvers: a new part or resolver that the allow-list does not know fails here."""
    checked = 0
    for path in sorted(CONF.rglob("*.yaml")):
        node = yaml.safe_load(path.read_text()) or {}
        node.pop("hydra", None)  # Hydra's own settings (sweepers, launchers) never reach a run's config.yaml
        check_run_config(OmegaConf.create(node), source=path)
        checked += "_target_" in path.read_text()
    assert checked > 30


@pytest.mark.parametrize("target", [
    "os.system", "builtins.exec", "subprocess.run", "torch.load", "pathlib.Path.touch",
    "ldm.commands.train.torch.load",          # a library function reached through a project module
    "ldm.commands.sample.Path",                # a library class the project imports
    "ldm.utils.errors.remove_new_run_dir",    # a project function that deletes a directory
    "ldm.utils.files.remove_partial_files",
    "ldm.nope.Missing",
])
def test_targets_outside_the_allow_list_are_refused(target):
    assert target_problem(target) is not None


def test_a_refusal_names_the_key_and_the_target_and_lists_every_problem():
    cfg = OmegaConf.create({"model": {"_target_": "ldm.models.dit.DiT"},
                            "conditioner": {"embedders": [{"_target_": "os.system", "command": "true"}]},
                            "schedule": {"_target_": "ldm.schedules.EDM", "_args_": [1]},
                            "sampler": {"_target_": "${oc.env:EVIL}"},
                            "data": {"image_size": "${oc.decode:'{_target_: os.system}'}",
                                     "root": "${oc.${oc.env:NAME}:x}", "channels": "${oc.env:LDM_CHANNELS,3}"}})
    with pytest.raises(UntrustedConfig) as caught:
        check_run_config(cfg, source="run/.hydra/config.yaml")
    message = str(caught.value)
    assert "conditioner.embedders.0._target_='os.system'" in message
    assert "schedule._args_" in message and "sampler._target_" in message
    assert "'oc.decode' is not allowed" in message and "is computed" in message
    assert "data.channels" not in message  # oc.env only reads a value: harmless
    assert "model._target_" not in message
    assert message.count("run/.hydra/config.yaml: ") == 5


def test_trusted_targets_extend_the_allow_list_by_exact_name():
    cfg = OmegaConf.create({"schedule": {"_target_": "my_package.MySchedule"}})
    with pytest.raises(UntrustedConfig, match="schedule._target_='my_package.MySchedule'"):
        check_run_config(cfg, source="x")
    check_run_config(cfg, source="x", trusted=["my_package.MySchedule"])
    with pytest.raises(UntrustedConfig):
        check_run_config(OmegaConf.create({"a": {"_target_": "my_package.MySchedule.os"}}), "x",
                     trusted=["my_package.MySchedule"])


# ---- a crafted run directory config --------------------------------------------------------------

CRAFTED_CONFIGS = {
    "os.system": lambda cfg, marker: cfg["model"].update({"_target_": "os.system", "command": f"touch {marker}"}),
    "through a project module": lambda cfg, marker: cfg["schedule"].update(
        {"_target_": "ldm.commands.train.os.system", "command": f"touch {marker}"}),
    "pathlib": lambda cfg, marker: cfg["sampler"].update(
        {"_target_": "pathlib.Path.touch", "_args_": [str(marker)]}),
    "oc.create": lambda cfg, marker: cfg.update(
        {"model": f"${{oc.create:{{_target_: os.system, command: 'touch {marker}'}}}}"}),
}


@pytest.mark.parametrize("name", CRAFTED_CONFIGS)
def test_a_crafted_run_config_builds_nothing(trained_run, tmp_path, name):
    marker = tmp_path / "MARKER"
    run_dir = copy_run(trained_run, tmp_path / "run")
    edit_run_config(run_dir, lambda cfg: CRAFTED_CONFIGS[name](cfg, marker))
    with pytest.raises(UntrustedConfig, match="nothing was built"):
        load_run(run_dir)
    assert not marker.exists()


def test_sample_py_refuses_a_crafted_run_config(trained_run, tmp_path):
    marker = tmp_path / "MARKER"
    run_dir = copy_run(trained_run, tmp_path / "run")
    evil = crafted_checkpoint(tmp_path / "evil.ckpt", marker)

    def edit(cfg):  # torch.load with weights_only off, the chain the issue names
        cfg["model"] = {"_target_": "torch.load", "f": str(evil), "weights_only": False}
    edit_run_config(run_dir, edit)
    with pytest.raises(AssertionError) as failed:
        run_script("sample.py", f"run={run_dir}", "n=2", "steps=1", f"out={tmp_path / 'out.npz'}")
    assert "model._target_='torch.load' is not allowed" in str(failed.value)
    assert not marker.exists() and not (tmp_path / "out.npz").exists()


# ---- a crafted checkpoint ------------------------------------------------------------------------

def test_a_crafted_checkpoint_is_refused_with_what_it_holds(tmp_path):
    marker = tmp_path / "MARKER"
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(crafted_checkpoint(tmp_path / "evil.ckpt", marker))
    message = str(caught.value)
    assert "evil.ckpt" in message and "posix.system" in message and "could run code" in message
    assert "weights_only=False" not in message and "weights_only` set to `False" not in message
    assert not marker.exists()


def test_sample_py_refuses_a_crafted_checkpoint(trained_run, tmp_path):
    marker = tmp_path / "MARKER"
    evil = crafted_checkpoint(tmp_path / "evil.ckpt", marker)
    with pytest.raises(AssertionError) as failed:
        run_script("sample.py", f"run={trained_run}", f"checkpoint={evil}", "n=2", "steps=1",
                   f"out={tmp_path / 'out.npz'}")
    assert str(evil) in str(failed.value)
    assert not marker.exists() and not (tmp_path / "out.npz").exists()


def test_sampling_skips_a_crafted_last_checkpoint_with_a_warning(trained_run, tmp_path, caplog):
    marker = tmp_path / "MARKER"
    run_dir = copy_run(trained_run, tmp_path / "run")
    crafted_checkpoint(run_dir / "checkpoints" / "last.ckpt", marker)
    with caplog.at_level("WARNING"):
        load_run(run_dir)  # falls back to an older checkpoint of the run
    assert "last.ckpt" in caplog.text and "posix.system" in caplog.text
    assert not marker.exists()


def test_resume_refuses_a_crafted_checkpoint(tmp_path):
    marker = tmp_path / "MARKER"
    evil = crafted_checkpoint(tmp_path / "evil.ckpt", marker)
    with pytest.raises(AssertionError) as failed:
        run_script("train.py", f"hydra.run.dir={tmp_path / 'run'}", f"resume={evil}", *TRAINED)
    assert "resume=" in str(failed.value) and "evil.ckpt" in str(failed.value)
    assert not marker.exists()


def test_resume_auto_refuses_a_crafted_last_checkpoint(tmp_path):
    marker = tmp_path / "MARKER"
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    crafted_checkpoint(run_dir / "checkpoints" / "last.ckpt", marker)
    with pytest.raises(AssertionError) as failed:
        run_script("train.py", f"hydra.run.dir={run_dir}", "resume=auto", *TRAINED)
    assert "resume=auto" in str(failed.value) and "posix.system" in str(failed.value)
    assert not marker.exists()


def test_resume_checkpoint_refuses_a_crafted_checkpoint_itself(tmp_path):
    """The same refusal without the command line's own check of `resume=` in front of it."""
    from ldm.commands.train import resume_checkpoint

    marker = tmp_path / "MARKER"
    evil = crafted_checkpoint(tmp_path / "evil.ckpt", marker)
    (tmp_path / "checkpoints").mkdir()
    crafted_checkpoint(tmp_path / "checkpoints" / "last.ckpt", marker)
    for resume in (str(evil), "auto"):
        with pytest.raises(CheckpointError, match=f"(?s)resume={resume}: .*posix.system"):
            resume_checkpoint(OmegaConf.create({"resume": resume}), tmp_path)
    assert not marker.exists()
