"""Checkpoint files: written atomically, read as data only (`weights_only=True`), found in a run's folder."""

from __future__ import annotations

import logging
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from ldm.utils.files import atomic_write

log = logging.getLogger(__name__)

LAST = "last.ckpt"
PREVIOUS = "previous.ckpt"
EMA_KEY = "ema_state_dict"  # a checkpoint's EMA weights, beside the raw ones in `state_dict`
POWER_EMA_KEY = "power_ema_state_dict"  # the post-hoc EMA's tracked averages (ldm/callbacks/phema.py)


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be used: empty, truncated, not a checkpoint, or from another run."""


def save_checkpoint(checkpoint: dict, path: str | Path) -> None:
    with atomic_write(path) as handle:
        torch.save(checkpoint, handle)


def load_checkpoint(path: str | Path, map_location: Any = "cpu", mmap: bool = False) -> dict:
    """Load a checkpoint as plain tensors and containers; never runs code stored in the file.

    `mmap=True` maps the tensors instead of reading them (for a look at a checkpoint's keys)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes): its writing never finished or a copy of it "
                              f"was cut short; use another checkpoint of the run (previous.ckpt, best-*.ckpt)")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive whose directory comes last
        raise CheckpointError(f"checkpoint {path} ({size} bytes) is truncated or not a checkpoint: it holds no "
                              f"complete zip archive, which is what torch.save writes")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        found = sorted(set(re.findall(r"GLOBAL ([\w.]+)", str(err))))
        names = f" ({', '.join(found)})" if found else ""
        raise CheckpointError(f"checkpoint {path} holds Python objects other than tensors and plain containers"
                              f"{names}, so it is refused: loading them could run code. Only checkpoints "
                              f"written by this project's training are loaded") from err
    except Exception as err:  # noqa: BLE001 - torch raises many kinds for damaged archives
        raise CheckpointError(f"checkpoint {path} ({size} bytes) is damaged or not a checkpoint: "
                              f"{_first_line(err)}") from err
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointError(f"checkpoint {path} is not a training checkpoint of this project (it has no "
                              f"state_dict)")
    return checkpoint


def _first_line(error: BaseException) -> str:
    # torch's own messages go on to suggest weights_only=False, which would let the file run code
    line = next((text for text in str(error).splitlines() if text.strip()), "")
    return f"{type(error).__name__}: {line}" if "weights_only" not in line else type(error).__name__


def fallback_order(dirpath: str | Path) -> list[Path]:
    """The checkpoints to try in order: last.ckpt, then previous.ckpt and the best-by-metric ones, newest first."""
    dirpath = Path(dirpath)
    if not dirpath.is_dir():
        return []
    others = [path for path in dirpath.glob("*.ckpt") if path.name != LAST and path.is_file()]
    # by when their contents were written (a hard link keeps the time of the write it shares)
    others.sort(key=lambda path: path.stat().st_mtime_ns, reverse=True)
    last = dirpath / LAST
    return ([last] if last.is_file() else []) + others


def newest_readable(dirpath: str | Path) -> tuple[Path, dict] | None:
    """The first checkpoint of `fallback_order` that loads, and its contents; None when there is none at all.

    Each unreadable one is skipped with a warning naming it and why; CheckpointError when none loads."""
    skipped = []
    for path in fallback_order(dirpath):
        try:  # memory-mapped: finding the checkpoint must not read it whole before Lightning reads it again
            checkpoint = load_checkpoint(path, mmap=True)
        except CheckpointError as err:
            skipped.append(str(err))
            continue
        for reason in skipped:
            log.warning("skipping an unreadable checkpoint: %s; using %s (step %s) instead",
                        reason, path, checkpoint.get("global_step", "?"))
        return path, checkpoint
    if skipped:
        raise CheckpointError(f"no checkpoint in {dirpath} can be read:\n  " + "\n  ".join(skipped)
                              + "\nmove them away to start this run over, or resume from another file")
    return None
