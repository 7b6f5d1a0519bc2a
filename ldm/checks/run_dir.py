"""Checks against what is already on disk: the `resume=` file, and an existing run directory's config.

A run directory belongs to the config that made it: `sample.py` and evaluation rebuild the run from
`.hydra/config.yaml`. Training again in it may change only the keys in `CHANGEABLE_ON_RESUME` (when to
stop, how often to validate and log, which hardware, where paths point); any other difference is
refused before anything is written, so the finished run stays usable.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from ldm.checks.findings import UNKNOWN, Findings
from ldm.run.renamed import with_current_targets

CONFIG_FILE = Path(".hydra") / "config.yaml"
# keys (or whole groups) that a continued run may set differently from the run that made the directory
CHANGEABLE_ON_RESUME = (
    "resume",
    "trainer.max_steps", "trainer.max_time", "trainer.max_epochs",
    "trainer.val_check_interval", "trainer.log_every_n_steps",
    "trainer.enable_progress_bar", "trainer.enable_model_summary",
    "trainer.accelerator", "trainer.devices", "trainer.num_nodes", "trainer.strategy",
    "data.num_workers",
    # speed settings: the same weights and optimizer state, computed faster
    "model.compile", "model.channels_last", "autoencoder.channels_last", "optimizer.fused", "optimizer.foreach",
    "paths", "logger", "hydra",
    # how the sample grids and metrics are drawn, not the weights
    "guidance", "callbacks.sample_grid.guidance", "callbacks.sample_metrics.guidance",
)
_ABSENT = "(not set)"


def resume_problems(found: Findings) -> None:
    """`resume=FILE` must name a checkpoint that training wrote; `auto` and null need nothing."""
    resume = found.value("resume")
    if resume in (None, False, "auto", UNKNOWN):
        return
    path = Path(str(resume)).expanduser()
    if path.is_dir():
        found.add(f"resume={resume} is a directory: give a checkpoint file, e.g. "
                  f"resume={path / 'checkpoints' / 'last.ckpt'} (or init_from={resume} to start from that run's "
                  "weights with a fresh optimizer)")
    elif not path.is_file():
        found.add(f"resume={resume}: no such file; use resume=auto (this run directory's checkpoints/last.ckpt), "
                  "resume=null (start afresh), or the path of a checkpoint file")
    elif path.stat().st_size == 0:
        found.add(f"resume={resume}: the file is empty (0 bytes; a save that was interrupted?): use another "
                  "checkpoint of the run (checkpoints/best-*.ckpt) or resume=null")
    elif reason := not_a_checkpoint(path):
        found.add(f"resume={resume}: {reason}; give a checkpoint that training wrote (checkpoints/*.ckpt) "
                  "or resume=null")


def not_a_checkpoint(path: Path) -> str | None:
    """Why `path` is no training checkpoint, or None. Reads it as data only, memory-mapped (no copy)."""

    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError:
        return ("the file holds objects other than tensors and plain containers, so it is refused "
                "(only checkpoints written by this project's training are loaded)")
    except Exception:  # EOFError, a zip or pickle error, ...: whatever it is, it is not a checkpoint
        return "not a checkpoint (not written by torch.save, or truncated)"
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        return "not a training checkpoint of this project (it has no state_dict)"
    return None


def run_dir_problems(cfg: DictConfig, run_dir: str | Path) -> list[str]:
    """One line per key whose value differs from the config stored in an existing run directory."""
    stored_path = Path(run_dir) / CONFIG_FILE
    if not stored_path.is_file():
        return []
    try:
        stored_cfg = with_current_targets(OmegaConf.load(stored_path))
        stored = OmegaConf.to_container(stored_cfg, resolve=False)
    except Exception as error:  # a damaged file is no finished run to protect, but say so rather than overwrite it
        return [f"hydra.run.dir={run_dir}: its {CONFIG_FILE} cannot be read ({error}); use a new directory"]
    current = OmegaConf.to_container(cfg, resolve=False)
    old, new = flatten(stored), flatten({k: v for k, v in current.items() if k != "hydra"})
    problems = []
    for key in sorted(old.keys() | new.keys()):
        if changeable(key) or old.get(key, _ABSENT) == new.get(key, _ABSENT):
            continue
        if key not in old and not any(other.startswith(key + ".") for other in old):
            continue  # a setting added to the project after the run was made: the run used its default
        if same_when_resolved(stored_cfg, cfg, key):
            continue  # e.g. a literal value now written as an interpolation that gives the same
        before, now = old.get(key, _ABSENT), new.get(key, _ABSENT)
        problems.append(f"{key}={now} differs from the run in {run_dir} (made with {key}={before}): a run directory "
                        "keeps the config that made it; train in a new directory (leave hydra.run.dir unset) or "
                        f"continue this run with {key}={before}")
    return problems


def same_when_resolved(stored: DictConfig, current: DictConfig, key: str) -> bool:
    """Whether `key` gives the same value in both configs once interpolations are resolved."""
    before, now = _resolved(stored, key), _resolved(current, key)
    return before is not _UNRESOLVED and now is not _UNRESOLVED and before == now


_UNRESOLVED = object()


def _resolved(cfg: DictConfig, key: str) -> Any:
    try:
        value = OmegaConf.select(cfg, key, default=_UNRESOLVED, throw_on_missing=True)
        return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
    except Exception:  # an interpolation that needs Hydra's runtime, or a missing value: not comparable
        return _UNRESOLVED


def changeable(key: str) -> bool:
    return any(key == allowed or key.startswith(allowed + ".") for allowed in CHANGEABLE_ON_RESUME)


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted key -> value for every leaf of nested mappings (lists are compared whole)."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    if not tree and prefix:
        return {prefix: {}}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat
