"""`sample(cfg)`: rebuild a run from its directory alone (config + EMA checkpoint) and draw images."""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from ldm.build import build_diffusion
from ldm.checkpoint import load_checkpoint
from ldm.images import make_grid, save_png, to_uint8

log = logging.getLogger(__name__)


def find_checkpoint(run_dir: Path, which: str) -> Path:
    if which not in ("last", "best"):
        path = Path(which)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint={which}: no such file")
        return path
    folder = run_dir / "checkpoints"
    candidates = [folder / "last.ckpt"] if which == "last" else sorted(folder.glob("best-*.ckpt"))
    candidates = [c for c in candidates if c.is_file()]
    if not candidates:
        raise FileNotFoundError(f"no {which} checkpoint in {folder}: is {run_dir} a finished training run?")
    return candidates[-1]


def load_run(run_dir: str | Path, checkpoint: str = "last", device: str | torch.device = "cpu"):
    """The run's config and its LatentDiffusion with the checkpoint's EMA weights (raw ones before the EMA started)."""
    run_dir = Path(run_dir)
    config_path = run_dir / ".hydra" / "config.yaml"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found: run= must be a training run directory")
    cfg = OmegaConf.load(config_path)
    if cfg.get("task", "diffusion") != "diffusion":
        raise ValueError(f"{run_dir} is a task={cfg.task} run; sampling needs a diffusion run")
    module = build_diffusion(cfg)
    module.load_checkpoint(load_checkpoint(find_checkpoint(run_dir, checkpoint)), ema=True)
    return cfg, module.to(device).eval()


def requested_conditions(cfg: DictConfig, run_cfg: DictConfig) -> tuple[dict, dict]:
    """The batch of conditions for n samples, and what to store about them in the npz."""
    prompts = list(cfg.prompts) if cfg.prompts else None
    if cfg.prompts_file:
        prompts = [line.strip() for line in Path(cfg.prompts_file).read_text().splitlines() if line.strip()]
    if prompts:
        captions = [prompts[i % len(prompts)] for i in range(cfg.n)]
        return {"caption": captions}, {"prompts": np.array(captions)}
    num_classes = run_cfg.data.get("num_classes")
    if cfg.labels is not None:
        labels = torch.tensor([cfg.labels[i % len(cfg.labels)] for i in range(cfg.n)])
    elif num_classes:
        labels = torch.arange(cfg.n) * num_classes // cfg.n  # spread evenly over the classes, in order
    else:
        return {}, {"labels": np.full(cfg.n, -1)}
    return {"label": labels}, {"labels": labels.numpy()}


def sample(cfg: DictConfig) -> Path:
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    run_cfg, module = load_run(cfg.run, cfg.checkpoint, device)
    sampler = hydra.utils.instantiate(cfg.sampler) if cfg.get("sampler") else module.sampler
    conditions, stored = requested_conditions(cfg, run_cfg)
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
    images = np.concatenate(images)
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, images=images, **stored)
    per_row = run_cfg.data.get("num_classes") or 10
    grid = save_png(make_grid(images[: per_row * 10], per_row), out.with_suffix(".png"), upscale=2)
    log.info("wrote %d samples to %s (grid %s)", len(images), out, grid)
    return out
