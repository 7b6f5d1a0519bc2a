"""`last.ckpt`, rewritten at every validation, when training ends, and when the job is told to stop (SIGTERM,
or a scheduler's signal before it requeues the job: ldm/run/requeue.py): what `resume=auto` continues from.

Before each rewrite the current `last.ckpt` is kept as `previous.ckpt` (a hard link, so no copy is
made, though the older weights stay on disk). If `last.ckpt` cannot be read (a disk fault, a copy cut
short), `resume=auto` and `sample.py` fall back to the newest readable of `previous.ckpt` and the
other checkpoints in the folder, with a warning.
"""

from __future__ import annotations

import logging
import zipfile
from pathlib import Path

from lightning.pytorch.callbacks import Checkpoint

from ldm.run.requeue import StopRequest, stop_signals
from ldm.utils.checkpoint import LAST, PREVIOUS
from ldm.utils.files import keep_copy, remove_partial_files

log = logging.getLogger(__name__)


def mid_accumulation(trainer) -> bool:
    """Whether the batch just trained on left its gradients for the next one (no optimizer step yet).

    Every epoch holds whole optimizer steps (ldm/data/order.py), so the count of batches of this epoch tells."""
    done = trainer.fit_loop.epoch_loop.batch_progress.current.ready
    return done % trainer.accumulate_grad_batches != 0


class LastCheckpoint(Checkpoint):
    """Independent of any metric, so a requeued or crashed run loses at most one validation interval.

    A `Checkpoint` subclass: Lightning runs these hooks after all other callbacks', so the EMA has
    swapped the raw weights back in before the save.
    """

    def __init__(self, dirpath: str):
        self.dirpath = Path(dirpath)
        self._saved_step = -1
        self._stop: StopRequest | None = None

    @property
    def path(self) -> Path:
        return self.dirpath / LAST

    @property
    def saved_step(self) -> int:
        """The step of the last save (or of the checkpoint the run resumed from); -1 before any."""
        return self._saved_step

    def setup(self, trainer, pl_module, stage):
        if trainer.is_global_zero:
            # leftovers of writes that a kill interrupted; rank 0 is the only writer here and has not started
            remove_partial_files(self.dirpath, only_dead_writers=False)

    def _save(self, trainer) -> None:
        if trainer.fast_dev_run or trainer.sanity_checking or trainer.global_step == self._saved_step:
            return
        # a file whose zip directory is incomplete is no checkpoint: it must not replace a good previous one
        if trainer.is_global_zero and self.path.is_file() and zipfile.is_zipfile(self.path):
            keep_copy(self.path, self.dirpath / PREVIOUS)
        trainer.save_checkpoint(self.path, weights_only=False)
        self._saved_step = trainer.global_step

    def on_train_start(self, trainer, pl_module):
        # after Lightning's own handlers, which it restores when fit ends (so this one goes with them)
        self._stop = StopRequest(stop_signals())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        # never between the batches of one optimizer step: their accumulated gradients are not in a checkpoint
        if self._stop is not None and not mid_accumulation(trainer) and self._stop.due(trainer):
            self._save(trainer)
            self._stop.hand_over(trainer.global_step, self.path)

    def on_validation_end(self, trainer, pl_module):
        if trainer.state.fn == "fit":
            self._save(trainer)

    def on_train_end(self, trainer, pl_module):
        self._save(trainer)

    def on_load_checkpoint(self, trainer, pl_module, checkpoint):
        self._saved_step = checkpoint.get("global_step", -1)
