"""`last.ckpt`, rewritten at every validation and when training ends: what `resume=auto` continues from."""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch.callbacks import Checkpoint

from ldm.files import remove_partial_files

LAST = "last.ckpt"


class LastCheckpoint(Checkpoint):
    """Independent of any metric, so a requeued or crashed run loses at most one validation interval.

    A `Checkpoint` subclass: Lightning runs these hooks after all other callbacks', so the EMA has
    swapped the raw weights back in before the save.
    """

    def __init__(self, dirpath: str):
        self.dirpath = Path(dirpath)
        self._saved_step = -1

    @property
    def path(self) -> Path:
        return self.dirpath / LAST

    def setup(self, trainer, pl_module, stage):
        if trainer.is_global_zero:
            remove_partial_files(self.dirpath)  # leftovers of writes that a kill interrupted

    def _save(self, trainer) -> None:
        if trainer.fast_dev_run or trainer.sanity_checking or trainer.global_step == self._saved_step:
            return
        trainer.save_checkpoint(self.path, weights_only=False)
        self._saved_step = trainer.global_step

    def on_validation_end(self, trainer, pl_module):
        if trainer.state.fn == "fit":
            self._save(trainer)

    def on_train_end(self, trainer, pl_module):
        self._save(trainer)

    def on_load_checkpoint(self, trainer, pl_module, checkpoint):
        self._saved_step = checkpoint.get("global_step", -1)
