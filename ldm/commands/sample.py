"""`sample(cfg)`: rebuild a run from its directory alone (config + EMA checkpoint, ldm.run.load) and draw images.

The arguments are checked, against the run's config too, before the model is built.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig

from ldm.checks.hydra import CheckSamplingConfig, checked_by_hydra
from ldm.checks.sampling import check_sampling, class_names_of
from ldm.conditioners.class_embedder import CLASS_NAMES, class_indices
from ldm.evaluation.seeded import CAPTION, LABEL, requested_prompts
from ldm.run.adapters import add_adapters
from ldm.run.build import build_diffusion
from ldm.run.guidance import resolve_guidance
from ldm.run.load import build_run, condition_inputs, preset_sampling, sampling_config
from ldm.utils.errors import ConfigError
from ldm.utils.images import make_grid, save_png, to_uint8

log = logging.getLogger(__name__)

def requested_conditions(cfg: DictConfig, run_cfg: DictConfig) -> tuple[dict, dict]:
    """The batch of conditions for n samples, and what to store about them in the npz.

    Raises ConfigError, before any model is built, for conditions that this run cannot use."""
    # argument types, label ranges and prompts for runs without captions are checked by
    # ldm.checks.sampling; here is what only the conditioner's inputs can tell
    inputs, prompts, errors = condition_inputs(run_cfg), requested_prompts(cfg), []
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
                given = class_indices(given, CLASS_NAMES[names]())
            labels = torch.tensor([given[i % len(given)] for i in range(cfg.n)])
        else:
            labels = torch.arange(cfg.n) * num_classes // cfg.n  # spread evenly over the classes, in order
        conditions[LABEL], stored["labels"] = labels, labels.numpy()
    if not stored:
        stored["labels"] = np.full(cfg.n, -1)
    return conditions, stored


def sample(cfg: DictConfig) -> Path:
    if not checked_by_hydra(CheckSamplingConfig):
        check_sampling(cfg)  # the arguments, before the run's config is built
    run_cfg = sampling_config(cfg)
    conditions, stored = requested_conditions(cfg, run_cfg)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    if preset_sampling(cfg):  # the weights come from the files the preset's config names
        module = build_diffusion(run_cfg).to(device).eval()
    else:
        module = build_run(run_cfg, Path(cfg.run), cfg.checkpoint, device, cfg.get("ema_length"))
    if cfg.get("lora"):  # LoRA files and runs on top, each with its scale
        add_adapters(module, list(cfg.lora), list(cfg.get("lora_scale") or []), cfg.get("trusted_targets") or ())
        module = module.to(device).eval()
    sampler = hydra.utils.instantiate(cfg.sampler) if cfg.get("sampler") else module.sampler
    own_run = None if preset_sampling(cfg) else cfg.run
    guidance = resolve_guidance(hydra.utils.instantiate(cfg.guidance), module, own_run, cfg.trusted_targets or ())
    generator = torch.Generator().manual_seed(cfg.seed)
    images = []
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=str(device).startswith("cuda"))
    for start in range(0, cfg.n, cfg.batch_size):
        stop = min(start + cfg.batch_size, cfg.n)
        chunk = {k: v[start:stop] for k, v in conditions.items()}
        with autocast:
            batch = module.sample(chunk, stop - start, sampler=sampler, steps=cfg.steps, guidance=guidance,
                                  generator=generator)
        images.append(to_uint8(batch.float()))
        log.info("sampled %d/%d", stop, cfg.n)  # a line per batch: visible in a piped log too
    images = np.concatenate(images)
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, images=images, **stored)
    per_row = run_cfg.data.get("num_classes") or 10
    shown = grid_order(stored.get("labels", np.full(cfg.n, -1)), per_row)  # text runs store prompts
    grid = save_png(make_grid(images[shown], per_row), out.with_suffix(".png"), upscale=2)
    log.info("wrote %d samples to %s (grid %s)", len(images), out, grid)
    return out


def grid_order(labels: np.ndarray, per_row: int, rows: int = 10) -> list[int]:
    """The samples the PNG grid shows: one column per class (its first `rows` samples, row by row) where labels
    were asked, else the first `per_row * rows`."""
    if (labels < 0).all():
        return list(range(min(len(labels), per_row * rows)))
    by_class = [np.flatnonzero(labels == label)[:rows] for label in range(per_row)]
    return [int(column[row]) for row in range(rows) for column in by_class if row < len(column)]
