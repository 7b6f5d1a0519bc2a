"""Checkpoint files: written atomically, read as data only (`weights_only=True`)."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from ldm.files import atomic_write


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be used: empty, truncated, not a checkpoint, or from another run."""


def save_checkpoint(checkpoint: dict, path: str | Path) -> None:
    with atomic_write(path) as handle:
        torch.save(checkpoint, handle)


def load_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict:
    """Load a checkpoint as plain tensors and containers; never runs code stored in the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes)")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(f"{path} holds objects other than tensors and plain containers, so it is refused "
                              f"(only checkpoints written by this project are loaded): {err}") from err
    except (EOFError, RuntimeError, zipfile.BadZipFile, OSError) as err:
        raise CheckpointError(f"checkpoint {path} is truncated or not a checkpoint: {err}") from err
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointError(f"{path} is not a training checkpoint of this project (no state_dict)")
    return checkpoint


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint I/O with a same-directory atomic write and a data-only load."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        save_checkpoint(checkpoint, path)

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict:
        return load_checkpoint(path, map_location if map_location is not None else "cpu")
