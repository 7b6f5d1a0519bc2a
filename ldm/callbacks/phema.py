"""Post-hoc EMA (EDM2): power-function averages of the trainable weights, with snapshots to reconstruct any length.

With `snapshot_every: N` the callback tracks one power-function EMA per `sigma_rels` entry (ldm.utils.power_ema)
and writes all of them every N optimizer steps, and at `trainer.max_steps`, to `checkpoints/phema/`
(ldm.utils.ema_snapshots). `python -m ldm.ema run=DIR sigma_rel=S` and `ema_length=S` of sample.py and
evaluate.py then reconstruct the EMA of length S from the snapshots. The plain EMA (ldm.callbacks.ema) is
untouched: validation and the run's own checkpoints keep using it.

The averages are part of the checkpoint, so a resumed run continues them; snapshots a killed run wrote after the
step it resumes from are removed, and the resumed run writes them again.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import lightning as L
import torch

from ldm.callbacks.ema import trainable_parameters
from ldm.utils.checkpoint import POWER_EMA_KEY, CheckpointError
from ldm.utils.ema_snapshots import list_snapshots, snapshot_folder, write_snapshot
from ldm.utils.files import remove_partial_files
from ldm.utils.power_ema import MAX_SIGMA_REL, decay, gamma_of

log = logging.getLogger(__name__)


class PostHocEMA(L.Callback):
    """One power-function EMA per sigma_rel, updated after every optimizer step; off while `snapshot_every` is None."""

    def __init__(self, dirpath: str, sigma_rels: Sequence[float] = (0.05, 0.10), snapshot_every: int | None = None):
        sigma_rels = tuple(float(sigma) for sigma in sigma_rels)
        if not sigma_rels or len(set(sigma_rels)) != len(sigma_rels) \
                or not all(0 < sigma < MAX_SIGMA_REL for sigma in sigma_rels):
            raise ValueError(f"callbacks.phema.sigma_rels must be distinct values in (0, {MAX_SIGMA_REL:.4f}), "
                             f"got {list(sigma_rels)}")
        if snapshot_every is not None and snapshot_every < 1:
            raise ValueError(f"callbacks.phema.snapshot_every must be at least 1 (or null: off), got {snapshot_every}")
        self.folder = snapshot_folder(dirpath)
        self.sigma_rels = sigma_rels
        self.gammas = [gamma_of(sigma) for sigma in sigma_rels]
        self.snapshot_every = snapshot_every
        self.averages: list[dict[str, torch.Tensor]] | None = None  # one per sigma_rel; None before the first step
        self._last_step = 0

    @property
    def enabled(self) -> bool:
        return self.snapshot_every is not None

    def setup(self, trainer, pl_module, stage):
        if self.enabled and stage == "fit" and trainer.is_global_zero:
            # leftovers of snapshot writes that a kill interrupted; rank 0 is the only writer and has not started
            remove_partial_files(self.folder, only_dead_writers=False)

    @torch.no_grad()
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step  # counts optimizer steps; unchanged while gradients accumulate
        if not self.enabled or step == self._last_step:
            return
        self._last_step = step
        params = {name: p.detach() for name, p in trainable_parameters(pl_module).items()}
        if self.averages is None:  # the first step's beta is 0: the average starts as the weights
            self.averages = [{name: p.float().clone() for name, p in params.items()} for _ in self.gammas]
        else:
            for gamma, average in zip(self.gammas, self.averages, strict=True):
                weight = 1.0 - decay(gamma, step)
                for name, p in params.items():
                    if average[name].device != p.device:
                        average[name] = average[name].to(p.device)
                    average[name].lerp_(p.float(), weight)
        if (step % self.snapshot_every == 0 or step == trainer.max_steps) and trainer.is_global_zero \
                and not trainer.fast_dev_run:
            write_snapshot(self.folder, step, self.sigma_rels, self.averages)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        if self.enabled and self.averages is not None:
            checkpoint[POWER_EMA_KEY] = {
                "sigma_rels": list(self.sigma_rels),
                "averages": [{name: value.detach().cpu() for name, value in average.items()}
                             for average in self.averages]}

    def on_load_checkpoint(self, trainer, pl_module, checkpoint):
        if not self.enabled:
            return
        step = checkpoint.get("global_step", 0)
        state = checkpoint.get(POWER_EMA_KEY)
        if state is not None and tuple(state["sigma_rels"]) != self.sigma_rels:
            raise CheckpointError(f"the checkpoint's post-hoc EMA tracks sigma_rels {state['sigma_rels']}, this run "
                                  f"callbacks.phema.sigma_rels={list(self.sigma_rels)}: continue it with those")
        self.averages = [{name: value.clone() for name, value in average.items()} for average in state["averages"]] \
            if state is not None else None
        self._last_step = step
        if trainer.is_global_zero:  # written after the checkpoint by a run that was stopped: written again now
            later = [snapshot for snapshot in list_snapshots(self.folder) if snapshot.step > step]
            for snapshot in later:
                snapshot.path.unlink(missing_ok=True)
            if later:
                log.info("removed %d post-hoc EMA snapshots after step %d; they are written again", len(later), step)
