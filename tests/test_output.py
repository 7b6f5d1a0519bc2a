"""What a user sees: progress lines in a log or pipe, no known-harmless warnings, a `--help` that does not
load torch, and runs/ under the project (or $LDM_ROOT) whatever the working directory."""

from __future__ import annotations

import io
import json
import logging
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from conftest import ROOT, TINY, run_script
from torch.utils.data import Dataset

from ldm.callbacks.progress import PlainTextProgress, progress_bar
from ldm.data.cache import compute_cache
from ldm.utils import config
from ldm.utils.quiet import silence_known_warnings

# what every run printed before they were silenced (each is harmless; see ldm/utils/quiet.py)
KNOWN_WARNINGS = ["module(s) in eval mode", "LeafSpec", "litlogger", "weights_only",
                  "not supported by the model summary"]

TRAINING_LINE = re.compile(r"^step (\d+)/20  train/loss [\d.]+  images/s [\d.]+  elapsed [\d:]+  eta [\d:]+$")


def test_a_piped_run_prints_progress_lines_and_no_known_warnings(tmp_path):
    # bf16, the default where the device has bf16 units: the model summary has a note about it
    result = run_script("train.py", *TINY, "logger=csv", "trainer.precision=bf16-mixed", "trainer.max_steps=20",
                        "trainer.val_check_interval=10",
                        "callbacks.progress.every_n_steps=5", "callbacks.progress.every_seconds=null",
                        f"hydra.run.dir={tmp_path / 'run'}")
    lines = result.stdout.splitlines()
    assert [int(m.group(1)) for line in lines if (m := TRAINING_LINE.match(line))] == [5, 10, 15, 20], result.stdout
    # the validation line: val/loss first, then the other validation metrics (sample metrics, noise levels)
    assert any(re.match(r"^step 10/20  val/loss [\d.]+(  val/\S+ [-\d.e]+)*$", line) for line in lines), result.stdout
    assert "it/s" not in result.stdout, "Lightning's own bar was added beside the plain lines"
    output = result.stdout + result.stderr
    assert not [w for w in KNOWN_WARNINGS if w in output], output
    assert output.count("Seed set to 0") == 1, output  # Lightning's lines once, not also through Hydra's logging


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("stdout, expected", [(_Terminal(), "StepProgressBar"), (io.StringIO(), "PlainTextProgress")])
def test_the_bar_follows_stdout_and_is_the_only_one(stdout, expected, monkeypatch):
    import lightning as L

    monkeypatch.setattr(sys, "stdout", stdout)
    bar = progress_bar()
    assert type(bar).__name__ == expected
    trainer = L.Trainer(callbacks=[bar], accelerator="cpu", logger=False, enable_checkpointing=False)
    assert trainer.progress_bar_callback is bar  # Lightning added no default bar of its own


def test_progress_refuses_a_step_interval_below_one():
    with pytest.raises(ValueError, match="every_n_steps=0"):
        PlainTextProgress(every_n_steps=0)


def test_known_warnings_are_silenced_and_others_are_not():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        silence_known_warnings()
        fit_loop = "lightning.pytorch.loops.fit_loop"
        warnings.warn_explicit("Found 71 module(s) in eval mode at the start of training. This may lead to ...",
                               UserWarning, "fit_loop.py", 1, module=fit_loop)
        warnings.warn_explicit("some other warning", UserWarning, "fit_loop.py", 1, module=fit_loop)
        # the same text from our own code is not silenced: it would be a real problem there
        warnings.warn_explicit("Found 2 module(s) in eval mode at the start of training", UserWarning,
                               "diffusion.py", 1, module="ldm.tasks.diffusion")
    assert [str(w.message) for w in caught] == ["some other warning",
                                                "Found 2 module(s) in eval mode at the start of training"]


def test_lightnings_tip_is_dropped_and_its_other_lines_kept(caplog):
    silence_known_warnings()
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    with caplog.at_level(logging.INFO, logger=logger.name):
        logger.info("💡 Tip: For seamless cloud logging and experiment tracking, try installing litlogger")
        logger.info("GPU available: False, used: False")
    assert [r.getMessage() for r in caplog.records] == ["GPU available: False, used: False"]


HEAVY = ("torch", "lightning")
LOADED = """
import runpy, sys, json
sys.argv = [sys.argv[1], *sys.argv[2:]]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit:
    pass
print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {heavy})))
"""


@pytest.mark.parametrize("command", [["train.py", "--help"], ["train.py", "--cfg", "job"], ["sample.py", "--help"]],
                         ids=" ".join)
def test_help_and_cfg_do_not_import_torch(command):
    """Hydra parses the arguments before anything heavy loads, so `--help` answers at once."""
    code = LOADED.format(heavy=set(HEAVY))
    result = subprocess.run([sys.executable, "-c", code, str(ROOT / command[0]), *command[1:]], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert not loaded, f"{' '.join(command)} imported {loaded[:5]}"


def _root_dir(cwd: Path) -> str:
    return run_script("train.py", "--cfg", "job", "--resolve", "-p", "paths.root_dir", cwd=cwd).stdout.strip()


def test_root_dir_is_the_project_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.delenv("LDM_ROOT", raising=False)
    assert _root_dir(tmp_path).endswith(str(ROOT)), "runs/ and the cache would land in the working directory"
    monkeypatch.setenv("LDM_ROOT", str(tmp_path / "elsewhere"))
    assert _root_dir(tmp_path).endswith(str(tmp_path / "elsewhere"))


def test_ldm_root_outside_a_checkout(tmp_path, monkeypatch):
    monkeypatch.delenv("LDM_ROOT", raising=False)
    installed = tmp_path / "site-packages" / "ldm"
    installed.mkdir(parents=True)
    assert config.checkout_root(installed) is None
    assert config.checkout_root(ROOT / "ldm") == ROOT
    monkeypatch.setattr(config, "checkout_root", lambda: None)
    monkeypatch.chdir(tmp_path)
    assert Path(config.ldm_root()) == tmp_path.resolve()  # an installed package: the working directory
    monkeypatch.setenv("LDM_ROOT", "relative/runs")
    assert Path(config.ldm_root()) == (tmp_path / "relative" / "runs").resolve()  # absolute, for saved configs


class _Images(Dataset):
    def __len__(self) -> int:
        return 100

    def __getitem__(self, i: int) -> dict:
        return {"image": torch.zeros(1, 2, 2)}


class _Encoder:
    def encode_posterior(self, image):
        return image, image


def test_building_the_cache_logs_progress(caplog):
    with caplog.at_level(logging.INFO, logger="ldm.data.cache"):
        compute_cache(_Images(), [lambda image: image], _Encoder(), {}, batch_size=10)
    lines = [r.getMessage() for r in caplog.records if r.name == "ldm.data.cache"]
    pattern = re.compile(r"cache: (\d+)/100 items \(\d+%\), [\d.]+ items/s")
    done = [int(m.group(1)) for line in lines if (m := pattern.match(line))]
    assert done == list(range(10, 101, 10)), lines  # every tenth of the items
