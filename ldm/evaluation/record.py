"""What an evaluation leaves behind: `metrics.json` (numbers and provenance), a sample grid, and a wandb run
in the training run's group."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from ldm.utils.files import atomic_write

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
WANDB_GROUP_LIMIT = 128  # characters wandb takes in a group name


def write_metrics(out_dir: str | Path, scores: dict, provenance: dict) -> Path:
    """`out_dir/metrics.json`: {"metrics": {name: value}, "provenance": {...}}, written atomically."""
    path = Path(out_dir) / METRICS_FILE
    with atomic_write(path) as handle:
        handle.write(json.dumps({"metrics": scores, "provenance": provenance}, indent=2, default=str).encode())
    return path


def read_metrics(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())


def training_group(run_dir: Path | None, run_cfg: DictConfig | None) -> str | None:
    """The wandb group the training run logged to (its `logger.wandb.group`, or its sweep directory for a job of
    a sweep); for a lone run its directory, so that every evaluation of one run lands in one group."""
    if run_dir is None:
        return None
    run_dir = Path(run_dir).resolve()
    group = OmegaConf.select(run_cfg, "logger.wandb.group", default=None, throw_on_resolution_failure=False) \
        if run_cfg is not None else None
    if group is None:
        hydra_file = run_dir / ".hydra" / "hydra.yaml"
        mode = OmegaConf.select(OmegaConf.load(hydra_file), "hydra.mode", default=None,
                                throw_on_resolution_failure=False) if hydra_file.is_file() else None
        # a sweep job's directory is <sweep dir>/<job number> (conf/hydra/default.yaml), the group training used
        group = str(run_dir.parent) if mode == "MULTIRUN" else str(run_dir)
    return str(group)[-WANDB_GROUP_LIMIT:]


def log_wandb(settings: DictConfig, out_dir: Path, group: str | None, name: str | None, scores: dict,
              provenance: dict, grid: Path | None = None, prompts: list[str] | None = None,
              images: np.ndarray | None = None) -> str | None:
    """One wandb run of job type `evaluate`: the scores as summary and history, the grid, and for text runs a
    table prompt -> image. Returns the run's directory (None when `settings.mode` is disabled)."""
    mode = settings.get("mode") or os.environ.get("WANDB_MODE", "offline")
    if mode == "disabled":
        return None
    import wandb  # deferred: heavy, only when logging to wandb

    run = wandb.init(project=settings.get("project", "ldm"), group=group, name=name, job_type="evaluate",
                     dir=str(out_dir), mode=mode, config=provenance, reinit="finish_previous")
    try:
        run.log(dict(scores))
        run.summary.update(scores)
        if grid is not None:
            run.log({"samples": wandb.Image(str(grid))})
        if prompts is not None and images is not None:
            run.log({"prompts": prompt_table(prompts, images)})
        return run.dir
    finally:
        run.finish()


def prompt_table(prompts: list[str], images: np.ndarray):
    """A wandb table of prompt -> image, (N, H, W, C) uint8 images."""
    import wandb  # deferred: heavy, only when logging to wandb

    table = wandb.Table(columns=["prompt", "image"])
    for prompt, image in zip(prompts, images, strict=True):
        table.add_data(prompt, wandb.Image(image[..., 0] if image.shape[-1] == 1 else image))
    return table
