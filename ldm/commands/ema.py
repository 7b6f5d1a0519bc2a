"""`reconstruct_ema(cfg)`: the weights of a post-hoc EMA of any length, from a run's snapshots (conf/ema.yaml).

    python -m ldm.ema run=DIR sigma_rel=0.08
    python -m ldm.ema -m run=DIR sigma_rel=0.05,0.08,0.12

writes DIR/checkpoints/phema/ema-0.08.safetensors (ldm.utils.ema_snapshots), which `sample.py run=DIR
ema_length=0.08` and `evaluate.py run=DIR ema_length=0.08` then read instead of reconstructing it themselves.
"""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig

from ldm.checks.hydra import CheckEmaConfig, checked_by_hydra
from ldm.checks.sampling import ema_problems
from ldm.utils.ema_snapshots import list_snapshots, reconstruct, snapshot_folder, write_reconstruction
from ldm.utils.errors import ConfigError

log = logging.getLogger(__name__)


def reconstruct_ema(cfg: DictConfig) -> Path:
    if not checked_by_hydra(CheckEmaConfig):
        if problems := ema_problems(cfg):
            raise ConfigError(problems)
    folder = snapshot_folder(Path(cfg.run).expanduser() / "checkpoints")
    weights, recipe = reconstruct(list_snapshots(folder), float(cfg.sigma_rel))
    path = write_reconstruction(folder, weights, recipe)
    log.info("sigma_rel %g at step %d from %d snapshots (profile fit error %.2g%%): wrote %s", recipe.sigma_rel,
             recipe.step, recipe.snapshots, 100 * recipe.fit_error, path)
    return path
