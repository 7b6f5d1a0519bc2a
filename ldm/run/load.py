"""Loading a run: its directory's config (allow-listed targets only, ldm.run.trust), its checkpoint and model.

A run directory is data from elsewhere: its config may build only allow-listed targets and its checkpoints
load as tensors only (ldm.utils.checkpoint). A preset (`preset=EXPERIMENT`) stands in for a run directory
where the weights come from published files.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from pathlib import Path

import torch
from hydra.utils import get_object
from omegaconf import DictConfig, OmegaConf

from ldm.run.build import build_diffusion
from ldm.run.presets import preset_config
from ldm.run.trust import load_run_config
from ldm.utils.checkpoint import CheckpointError, load_checkpoint, newest_readable
from ldm.utils.ema_snapshots import reconstructed, snapshot_folder
from ldm.utils.errors import UserError


def read_run_config(run_dir: str | Path, trusted: Iterable[str] = (), task: str = "diffusion",
                    key: str = "run") -> DictConfig:
    """The run's config, checked against the allow-list before anything in it is resolved; `key` names the
    argument that gave the directory in errors."""
    run_dir = Path(run_dir)
    config_path = run_dir / ".hydra" / "config.yaml"
    if not config_path.is_file():
        raise UserError(f"{key}={run_dir}: {config_path} not found: {key}= must be a training run directory")
    cfg = load_run_config(config_path, trusted)
    if cfg.get("task", "diffusion") != task:
        need = "sampling needs a diffusion run" if task == "diffusion" else f"it must be a task={task} run"
        raise UserError(f"{key}={run_dir} is a task={cfg.get('task', 'diffusion')} run; {need}")
    return cfg


def preset_sampling(cfg: DictConfig) -> bool:
    """sample.py preset=EXPERIMENT without run=: a model built from the weight files its config names."""
    return OmegaConf.is_missing(cfg, "run") or cfg.run is None


def sampling_config(cfg: DictConfig) -> DictConfig:
    """The model's config: the run directory's (checked against the allow-list), or a composed preset's."""
    if preset_sampling(cfg):
        return preset_config(cfg.preset, list(cfg.get("preset_overrides") or []))
    return read_run_config(cfg.run, cfg.get("trusted_targets") or ())


def run_checkpoint(run_dir: Path, which: str) -> dict:
    """`last` (falling back to the newest readable checkpoint, with a warning), `best`, or a file."""
    folder = run_dir / "checkpoints"
    if which == "last":
        found = newest_readable(folder)
        if found is None:
            raise CheckpointError(f"no checkpoint in {folder}: is {run_dir} a finished training run?")
        return found[1]
    if which == "best":
        best = sorted(folder.glob("best-*.ckpt"), key=lambda path: path.stat().st_mtime_ns)
        if not best:
            raise CheckpointError(f"checkpoint=best: no best-*.ckpt in {folder}; use checkpoint=last")
        return load_checkpoint(best[-1])
    return load_checkpoint(which)


def load_run(run_dir: str | Path, checkpoint: str = "last", device: str | torch.device = "cpu",
             trusted: Iterable[str] = ()):
    """The run's config and its LatentDiffusion with the checkpoint's EMA weights (raw ones before the EMA started).

    `trusted`: exact `_target_` names outside the project that this run may build (see ldm.run.trust)."""
    cfg = read_run_config(run_dir, trusted)
    return cfg, build_run(cfg, Path(run_dir), checkpoint, device)


def build_run(cfg: DictConfig, run_dir: Path, checkpoint: str, device: str | torch.device,
              ema_length: float | None = None):
    """The run's module with its checkpoint's weights; with `ema_length`, the post-hoc EMA of that length instead."""
    weights = run_checkpoint(run_dir, checkpoint)
    module = build_diffusion(cfg)
    module.load_checkpoint(weights, ema=True)
    if ema_length is not None:
        load_post_hoc_ema(module, run_dir, ema_length)
    return module.to(device).eval()


def load_post_hoc_ema(module: torch.nn.Module, run_dir: Path, ema_length: float) -> dict[str, str]:
    """Put the post-hoc EMA of length `ema_length` (sigma_rel), reconstructed from the run's snapshots (or the file
    `python -m ldm.ema` wrote of it), into the module's trainable parameters; returns how it was made."""
    weights, metadata = reconstructed(snapshot_folder(Path(run_dir) / "checkpoints"), float(ema_length))
    params = {name: p for name, p in module.named_parameters() if p.requires_grad}
    if weights.keys() != params.keys():
        differ = sorted(weights.keys() ^ params.keys())
        raise CheckpointError(f"ema_length={ema_length}: the post-hoc EMA snapshots of {run_dir} hold other parameters "
                              f"than the run's trainable ones (e.g. {differ[:3]}): were they written by another run?")
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)
    return metadata


def condition_inputs(run_cfg: DictConfig) -> dict[str, int | None]:
    """The batch keys the run's conditioner reads, each with its number of classes (for labels)."""
    inputs = {}
    for embedder in run_cfg.conditioner.get("embedders") or []:
        key = embedder.get("input_key")
        if key is None:  # the embedder's default; its target passed the allow-list, so looking it up is safe
            key = inspect.signature(get_object(embedder._target_)).parameters["input_key"].default
        inputs[key] = embedder.get("num_classes", run_cfg.data.get("num_classes"))
    return inputs
