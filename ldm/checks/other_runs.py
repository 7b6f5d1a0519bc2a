"""Checks of what a run takes from another run: `init_from=RUN_DIR` (its weights) and `resume=FILE` (all of it).

`init_from` must name a finished run (its `checkpoints/last.ckpt` at its `trainer.max_steps`) of the same
task with the same model, autoencoder and conditioner, so its weights fit. `resume=FILE` continues the saved
optimizer and learning-rate schedule exactly: settings of those that differ from the run the file comes from
would be silently overridden by the saved state, so they are refused, pointing to `init_from`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from ldm.checks.findings import UNKNOWN, Findings
from ldm.checks.run_dir import CONFIG_FILE, changeable, flatten, not_a_checkpoint
from ldm.run.renamed import with_current_targets
from ldm.utils.checkpoint import LAST

# the groups whose weights init_from carries over: they must be built alike (speed settings may differ)
WEIGHT_GROUPS = ("task", "model", "autoencoder", "conditioner")
# what the saved optimizer state and learning-rate schedule hold: set by the checkpoint, not by the command
OPTIMIZER_GROUPS = ("optimizer", "lr_scheduler")


def stored_config(run_dir: Path) -> DictConfig | None:
    try:
        return with_current_targets(OmegaConf.load(run_dir / CONFIG_FILE))
    except Exception:  # noqa: BLE001 - missing or unreadable: the caller says which
        return None


def differences(stored: DictConfig, current: DictConfig, groups: tuple[str, ...]) -> list[tuple[str, Any, Any]]:
    """(key, stored value, current value) for every leaf of `groups` that differs once resolved."""
    found = []
    for group in groups:
        old, new = _resolved(stored, group), _resolved(current, group)
        old, new = flatten(old, group), flatten(new, group)
        for key in sorted(old.keys() | new.keys()):
            if not changeable(key) and old.get(key, "(not set)") != new.get(key, "(not set)"):
                found.append((key, old.get(key, "(not set)"), new.get(key, "(not set)")))
    return found


def _resolved(cfg: DictConfig, key: str) -> Any:
    value = OmegaConf.select(cfg, key, default=None, throw_on_resolution_failure=False)
    try:
        return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
    except Exception:  # noqa: BLE001 - an interpolation that needs Hydra's runtime: compare it as written
        return OmegaConf.to_container(value, resolve=False)


def init_from_problems(found: Findings) -> None:
    """`init_from=RUN_DIR`: a finished run whose model, autoencoder and conditioner are this run's."""
    init_from = found.value("init_from")
    if init_from in (None, UNKNOWN):
        return
    resume = found.value("resume")
    if resume not in (None, False, "auto", UNKNOWN):
        found.add(f"init_from={init_from} and resume={resume} both say where the weights come from: use "
                  "init_from=RUN_DIR to start a new run from that run's weights (fresh optimizer, step 0), or "
                  "resume=FILE to continue a run exactly as it was", key="init_from")
        return
    run_dir = Path(str(init_from)).expanduser()
    last = run_dir / "checkpoints" / LAST
    stored = stored_config(run_dir)
    if not run_dir.is_dir():
        problem = "no such directory"
    elif stored is None:
        problem = f"no readable {CONFIG_FILE} (not a run directory made by train.py)"
    elif not last.is_file():
        problem = f"no checkpoints/{LAST} (the run never validated or finished)"
    else:
        problem = not_a_checkpoint(last)
    if problem:
        found.add(f"init_from={init_from}: {problem}; give the directory of a finished training run "
                  "(it holds .hydra/config.yaml and checkpoints/last.ckpt)", key="init_from")
        return
    step = int(torch.load(last, map_location="cpu", weights_only=True, mmap=True)["global_step"])
    max_steps = OmegaConf.select(stored, "trainer.max_steps", default=-1)
    if isinstance(max_steps, int) and max_steps > 0 and step < max_steps:
        found.add(f"init_from={init_from}: the run stopped at step {step} of its trainer.max_steps={max_steps}, "
                  f"so it is not finished: finish it first (the command that made it, hydra.run.dir={run_dir}), "
                  "or continue it as it is with resume=" + str(last), key="init_from")
    for key, before, now in differences(stored, found.cfg, WEIGHT_GROUPS):
        found.add(f"init_from={init_from}: {key}={now} but that run was made with {key}={before}, so its weights "
                  f"do not fit this model: use {key}={before}, or start without init_from", key="init_from")


def resume_settings_problems(found: Findings) -> None:
    """`resume=FILE`: the optimizer and learning-rate settings of the run the file comes from, unchanged."""
    resume = found.value("resume")
    if resume in (None, False, "auto", UNKNOWN) or "resume" in found.wrong:
        return
    path = Path(str(resume)).expanduser()
    run_dir = path.parent.parent  # RUN_DIR/checkpoints/FILE
    stored = stored_config(run_dir) if path.is_file() else None
    if stored is None:
        return
    for key, before, now in differences(stored, found.cfg, OPTIMIZER_GROUPS):
        found.add(f"{key}={now} would not apply: resume={resume} continues the saved optimizer state and learning-"
                  f"rate schedule of the run in {run_dir}, made with {key}={before}; to train its weights with "
                  f"{key}={now} from step 0 with a fresh optimizer, use init_from={run_dir} instead of resume=, "
                  f"or continue it as it was with {key}={before}", key=key)
