"""Checkpoint files: written atomically, read as data only (`weights_only=True`)."""

from __future__ import annotations

import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from ldm.files import atomic_write


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

