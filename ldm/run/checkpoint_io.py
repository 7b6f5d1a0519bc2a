"""Lightning's checkpoint I/O with the project's atomic save and data-only load (ldm.utils.checkpoint)."""

from __future__ import annotations

from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from ldm.utils.checkpoint import load_checkpoint, save_checkpoint


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint I/O with a same-directory atomic write and a data-only load."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        save_checkpoint(checkpoint, path)

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict:
        return load_checkpoint(path, map_location if map_location is not None else "cpu")
