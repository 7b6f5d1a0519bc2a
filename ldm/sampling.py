"""`sample(cfg)`: rebuild a run from its directory alone (config + EMA checkpoint) and draw images.

A run directory is data from elsewhere: its config may build only allow-listed targets (ldm.trust)
and its checkpoints load as tensors only (ldm.checkpoint). The arguments are checked, against the
run's config too, before the model is built.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Iterable
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from ldm.callbacks.last_checkpoint import newest_readable
from ldm.checkpoint import CheckpointError, load_checkpoint
from ldm.errors import ConfigError, UserError
from ldm.images import make_grid, save_png, to_uint8
from ldm.sample_checks import check_sampling, class_names_of
from ldm.trust import load_run_config

log = logging.getLogger(__name__)

CAPTION, LABEL = "caption", "label"  # the condition inputs sample.py can give


def run_config(run_dir: str | Path, trusted: Iterable[str] = ()) -> DictConfig:
    """The run's config, checked against the allow-list before anything in it is resolved."""
    run_dir = Path(run_dir)
    config_path = run_dir / ".hydra" / "config.yaml"
    if not config_path.is_file():
        raise UserError(f"run={run_dir}: {config_path} not found: run= must be a training run directory")
    cfg = load_run_config(config_path, trusted)
    if cfg.get("task", "diffusion") != "diffusion":
        raise UserError(f"run={run_dir} is a task={cfg.task} run; sampling needs a diffusion run")
    return cfg


def preset_sampling(cfg: DictConfig) -> bool:
    """sample.py preset=EXPERIMENT without run=: a model built from the weight files its config names."""
    return OmegaConf.is_missing(cfg, "run") or cfg.run is None


def sampling_config(cfg: DictConfig) -> DictConfig:
    """The model's config: the run directory's (checked against the allow-list), or a composed preset's."""
    if preset_sampling(cfg):
        from ldm.presets import preset_config

        return preset_config(cfg.preset, list(cfg.get("preset_overrides") or []))
    return run_config(cfg.run, cfg.get("trusted_targets") or ())


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

    `trusted`: exact `_target_` names outside the project that this run may build (see ldm.trust)."""
    cfg = run_config(run_dir, trusted)
    return cfg, build_run(cfg, Path(run_dir), checkpoint, device)


def build_run(cfg: DictConfig, run_dir: Path, checkpoint: str, device: str | torch.device):
    from ldm.build import build_diffusion

    weights = run_checkpoint(run_dir, checkpoint)
    module = build_diffusion(cfg)
    module.load_checkpoint(weights, ema=True)
    return module.to(device).eval()


def _prompts(cfg: DictConfig) -> list[str] | None:
    if cfg.prompts_file:
        prompts = [line.strip() for line in Path(cfg.prompts_file).read_text().splitlines() if line.strip()]
        if not prompts:
            raise ConfigError([f"prompts_file={cfg.prompts_file} holds no prompt (one per line)"])
        return prompts
    return list(cfg.prompts) if cfg.prompts is not None else None


def condition_inputs(run_cfg: DictConfig) -> dict[str, int | None]:
    """The batch keys the run's conditioner reads, each with its number of classes (for labels)."""
    from hydra.utils import get_object

    inputs = {}
    for embedder in run_cfg.conditioner.get("embedders") or []:
        key = embedder.get("input_key")
        if key is None:  # the embedder's default; its target passed the allow-list, so looking it up is safe
            key = inspect.signature(get_object(embedder._target_)).parameters["input_key"].default
        inputs[key] = embedder.get("num_classes", run_cfg.data.get("num_classes"))
    return inputs


def requested_conditions(cfg: DictConfig, run_cfg: DictConfig) -> tuple[dict, dict]:
    """The batch of conditions for n samples, and what to store about them in the npz.

    Raises ConfigError, before any model is built, for conditions that this run cannot use."""
    # argument types, label ranges and prompts for runs without captions are checked by
    # ldm.sample_checks; here is what only the conditioner's inputs can tell
    inputs, prompts, errors = condition_inputs(run_cfg), _prompts(cfg), []
    if CAPTION in inputs and not prompts:
        errors.append("prompts: this run is conditioned on captions; give prompts='[\"...\"]' or prompts_file=FILE")
    num_classes = inputs.get(LABEL)
    if LABEL in inputs and cfg.labels is None and not num_classes:
        errors.append("labels: this run's number of classes is not in its config; give labels=[...]")
    unknown = sorted(set(inputs) - {CAPTION, LABEL})
    if unknown:
        errors.append(f"run: its conditioner reads {unknown}, which sample.py cannot give (only captions and labels)")
    if errors:
        raise ConfigError(errors)

    conditions, stored = {}, {}
    if CAPTION in inputs:
        captions = [prompts[i % len(prompts)] for i in range(cfg.n)]
        conditions[CAPTION], stored["prompts"] = captions, np.array(captions)
    if LABEL in inputs:
        if cfg.labels is not None:
            given = list(cfg.labels)
            if names := class_names_of(run_cfg):  # labels may be class names, e.g. ["golden retriever"]
                from ldm.conditioners.class_embedder import CLASS_NAMES, class_indices

                given = class_indices(given, CLASS_NAMES[names]())
            labels = torch.tensor([given[i % len(given)] for i in range(cfg.n)])
        else:
            labels = torch.arange(cfg.n) * num_classes // cfg.n  # spread evenly over the classes, in order
        conditions[LABEL], stored["labels"] = labels, labels.numpy()
    if not stored:
        stored["labels"] = np.full(cfg.n, -1)
    return conditions, stored


def sample(cfg: DictConfig) -> Path:
    check_sampling(cfg)  # the arguments, before the run's config is built
    run_cfg = sampling_config(cfg)
    conditions, stored = requested_conditions(cfg, run_cfg)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    if preset_sampling(cfg):  # the weights come from the files the preset's config names
        from ldm.build import build_diffusion

        module = build_diffusion(run_cfg).to(device).eval()
    else:
        module = build_run(run_cfg, Path(cfg.run), cfg.checkpoint, device)
    sampler = hydra.utils.instantiate(cfg.sampler) if cfg.get("sampler") else module.sampler
    generator = torch.Generator().manual_seed(cfg.seed)
    images = []
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=str(device).startswith("cuda"))
    for start in range(0, cfg.n, cfg.batch_size):
        stop = min(start + cfg.batch_size, cfg.n)
        chunk = {k: v[start:stop] for k, v in conditions.items()}
        with autocast:
            batch = module.sample(chunk, stop - start, sampler=sampler, steps=cfg.steps, guidance=cfg.guidance,
                                  guidance_rescale=cfg.guidance_rescale, guidance_interval=cfg.guidance_interval,
                                  generator=generator)
        images.append(to_uint8(batch.float()))
        log.info("sampled %d/%d", stop, cfg.n)  # a line per batch: visible in a piped log too
    images = np.concatenate(images)
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, images=images, **stored)
    per_row = run_cfg.data.get("num_classes") or 10
    grid = save_png(make_grid(images[: per_row * 10], per_row), out.with_suffix(".png"), upscale=2)
    log.info("wrote %d samples to %s (grid %s)", len(images), out, grid)
    return out
