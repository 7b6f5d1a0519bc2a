"""Shared test helpers: compose the real configs with Hydra's compose API."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

import ldm  # noqa: F401  (registers the config resolvers)

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs a worker per core: each, and what it starts, takes one
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
else:
    torch.set_num_threads(min(2, torch.get_num_threads()))

# small, fast settings shared by tests that really train
TINY = [
    "trainer.accelerator=cpu",
    "data.batch_size=32",
    "data.cache=false",
    "model.depth=2",
    "diffusion.sample_steps=2",
    "lr_scheduler.warmup_steps=0",
    "callbacks.sample_grid.per_row=2",
    "callbacks.sample_metrics.num_samples=16",
    "callbacks.noise_levels.batch_size=8",
    # short runs: an EMA that starts at once and follows quickly, so validation sees training progress
    "callbacks.ema.update_starting_at_step=0",
    "callbacks.ema.decay=0.9",
]


def compose_config(overrides: list[str], output_dir: Path | None = None, name: str = "train") -> DictConfig:
    """The config the entry point composes from these command-line arguments (`guidance=G` is guidance.scale=G)."""
    from ldm.run.renamed import guidance_arguments
    from ldm.utils.errors import ConfigError

    overrides, problems = guidance_arguments(list(overrides))
    if problems:
        raise ConfigError(problems)
    extra = [f"paths.output_dir={output_dir}"] if output_dir is not None else []
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name=name, overrides=overrides + extra)


def run_script(script: str, *args: str, cwd: Path = ROOT, timeout: int | None = None):
    """Run train.py / sample.py as a user would; returns the CompletedProcess (raises on failure)."""
    from forked import run

    env = dict(os.environ, PYTHONPATH=str(ROOT), HYDRA_FULL_ERROR="1")
    result = run(script, *args, cwd=cwd, env=env, timeout=timeout)
    if result.returncode != 0:
        raise AssertionError(f"{script} {' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """One short real training run (csv logger), shared by the tests that need a finished run (read-only): made
    once for the whole suite, by whichever parallel worker needs it first."""
    from filelock import FileLock

    from ldm.commands.train import train

    shared = tmp_path_factory.getbasetemp()
    shared = shared.parent if os.environ.get("PYTEST_XDIST_WORKER") else shared  # the workers' common folder
    out = shared / "trained_run"
    with FileLock(str(out) + ".lock"):
        if not (out / "checkpoints" / "last.ckpt").is_file():
            cfg = compose_config(TINY + ["logger=csv", "trainer.max_steps=60", "trainer.val_check_interval=20"], out)
            _save_config(cfg, out)
            train(cfg)
    return out


def train_run(overrides: list[str], out: Path):
    """Train in-process as `python train.py` would, leaving a run directory that sample.py can rebuild."""
    from ldm.commands.train import train

    cfg = compose_config(overrides, out)
    _save_config(cfg, out)
    return train(cfg)


def _save_config(cfg: DictConfig, out: Path) -> None:
    """What Hydra writes for a real run, so sample.py can rebuild it from the directory alone."""
    from omegaconf import OmegaConf

    (out / ".hydra").mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, out / ".hydra" / "config.yaml")


@pytest.fixture
def no_model(monkeypatch):
    """A check that builds a part of the model fails the test: the checks read config and cheap facts only."""
    build = torch.nn.Module.__init__

    def refuse(self, *args, **kwargs):
        if type(self).__module__.startswith(("ldm.", "open_clip", "lightning")):
            raise AssertionError(f"{type(self).__name__} was built during the config check")
        build(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "__init__", refuse)


@pytest.fixture
def one_thread():
    """Tiny tensors gain nothing from a second thread, and on a busy CPU waiting for it costs far more than
    the work; restored for the other test files. A module opts in with pytestmark = usefixtures("one_thread")."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def perturb(model, scale=0.05, seed=1):
    """Move every parameter off its initial value, so that no zero-initialized layer hides a wrong key."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(scale * torch.randn(parameter.shape, generator=generator))
    return model



def digits_accuracy(images, labels) -> float:
    """The project's one digits judge (the shipped feature network's class head, as `accuracy_digits`)."""
    from ldm.metrics.attributes import AttributeAccuracy
    from ldm.metrics.features import unit_images
    from ldm.metrics.project_features import ProjectFeatures

    judge = ProjectFeatures("digits")
    targets = judge.targets(labels=torch.as_tensor(labels))
    accuracy = AttributeAccuracy(list(targets))
    with torch.no_grad():
        accuracy.update(judge.classify(unit_images(images)), targets)
    return float(accuracy.compute()["all"])
