"""The LightningDataModule shared by every data set: loaders plus what the rest of the app asks of data."""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from ldm.data.cache import cached_dataset
from ldm.data.order import BatchShard, EpochShuffle
from ldm.utils.errors import ConfigError


class DataModule(L.LightningDataModule):
    """Wraps a train and a validation dataset whose items are dicts (`image`, and `label`/`caption`/...)."""

    def __init__(self, train: Dataset, val: Dataset, image_size: int, channels: int, num_classes: int | None = None,
                 batch_size: int = 128, num_workers: int = 0, val_batch_size: int | None = None,
                 cache: bool = False, cache_dir: str = ".cache/ldm", seed: int | None = None,
                 root: str | None = None, val_fraction: float | None = None, flip: bool = False):
        # image_size, channels, seed, root, val_fraction and flip are stated once in the data config for its
        # datasets and other groups to interpolate; the datasets arrive built. They are named here, not
        # taken as **kwargs, so that a misspelled or unknown data key is an error instead of being ignored.
        super().__init__()
        self.image_size, self.channels = image_size, channels
        self.cache, self.cache_dir = cache, cache_dir
        self.train_set, self.val_set = train, val
        self.num_classes = num_classes
        self.batch_size, self.num_workers = batch_size, num_workers
        self.val_batch_size = val_batch_size or batch_size
        self._grids: dict[int, tuple[dict, int]] = {}
        self.shuffle_seed = 0  # the run's seed (set by training): the data order of every epoch follows from it
        self._resume_at: tuple[int, int, int] | None = None  # (epoch, items done, batches done) at resume

    def attach_cache(self, autoencoder, conditioner, data_config: dict, device="cpu") -> None:
        """With `cache: true`, swap both splits for their cached versions (built once, then read)."""
        if not self.cache:
            return
        self.train_set, self.val_set = (
            cached_dataset(dataset, split, data_config, autoencoder, conditioner, self.cache_dir,
                           num_workers=self.num_workers, device=device)
            for dataset, split in ((self.train_set, "train"), (self.val_set, "val"))
        )
        self._grids.clear()

    def _loader(self, dataset: Dataset, batch_size: int, sampler, drop_last: bool) -> DataLoader:
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
                          pin_memory=torch.cuda.is_available())

    def _rank_and_world(self) -> tuple[int, int]:
        """This process's share of the data: (global rank, world size) under a trainer, else the whole of it."""
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    # Lightning's own distributed sampler is switched off (training.py): these loaders shard by rank themselves
    def train_dataloader(self) -> DataLoader:
        rank, world = self._rank_and_world()
        if len(self.train_set) < self.batch_size * world:
            raise ConfigError([f"data.batch_size={self.batch_size}: the training set has {len(self.train_set)} items, "
                               f"fewer than one batch for each of the {world} ranks; use data.batch_size at most "
                               f"{len(self.train_set) // world}"])
        accumulate = self.trainer.accumulate_grad_batches if self.trainer is not None else 1
        if len(self.train_set) < self.batch_size * world * accumulate:
            raise ConfigError([f"data.batch_size={self.batch_size} with trainer.accumulate_grad_batches={accumulate}: "
                               f"the training set has {len(self.train_set)} items, fewer than one optimizer step "
                               f"for each of the {world} ranks; use a smaller batch or fewer accumulated batches"])
        order = EpochShuffle(len(self.train_set), self.shuffle_seed, self.batch_size, rank, world, accumulate)
        if self._resume_at is not None:
            order.resume_at(*self._resume_at[:2])
        return self._loader(self.train_set, self.batch_size, order, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        rank, world = self._rank_and_world()
        size, batch = len(self.val_set), self.val_batch_size
        if -(-size // batch) < world:  # a rank without a batch would never join the reduction of val/loss
            raise ConfigError([f"the validation set has {size} items, {-(-size // batch)} batches of {batch}: fewer "
                               f"than one for each of the {world} ranks; set data.val_batch_size (or "
                               f"+data.val_batch_size) to at most {max(1, size // world)}"])
        return self._loader(self.val_set, batch, BatchShard(size, batch, rank, world), drop_last=False)

    def val_batch_number(self, batch_idx: int) -> int:
        """The place in the whole validation pass of this rank's `batch_idx`-th batch (the order of BatchShard)."""
        rank, world = self._rank_and_world()
        return rank + batch_idx * world

    # the data position travels in checkpoints, so a resumed run continues mid-epoch with the same batches
    def state_dict(self) -> dict:
        trainer = self.trainer
        if trainer is None:
            return {}
        # processed, not completed: a save in on_train_batch_end comes before Lightning counts the batch completed
        epoch, done = trainer.current_epoch, trainer.fit_loop.epoch_loop.batch_progress.current.processed
        items = done * self.batch_size * trainer.world_size  # used by all ranks together
        if self._resume_at is not None and self._resume_at[0] == epoch:
            # this epoch began in an earlier run, perhaps with another number of ranks
            _, items_then, batches_then = self._resume_at
            items = items_then + (done - batches_then) * self.batch_size * trainer.world_size
        return {"epoch": epoch, "items_done": items, "batches_done": done}

    def load_state_dict(self, state: dict) -> None:
        if state:
            # checkpoints from before `batches_done` was stored come from one process
            batches = state.get("batches_done", state["items_done"] // self.batch_size)
            self._resume_at = (state["epoch"], state["items_done"], batches)

    def grid_conditions(self, per_row: int) -> tuple[dict, int]:
        """Conditions for a sample grid and how many samples: one row per class, plus validation captions.

        Computed once: every grid of a run then shows the same conditions."""
        if per_row not in self._grids:
            self._grids[per_row] = self._grid_conditions(per_row)
        return self._grids[per_row]

    def _grid_conditions(self, per_row: int, rows: int = 8) -> tuple[dict, int]:
        conditions: dict = {}
        n = per_row * rows
        if self.num_classes:
            conditions["label"] = torch.arange(self.num_classes).repeat_interleave(per_row)
            n = self.num_classes * per_row
        first = self.val_set[0]
        if "caption" in first:
            # with labels, each row's captions come from validation items of that class
            items = [self.val_set[i] for i in range(min(len(self.val_set), 50 * n))]
            if "label" in conditions:
                by_label = {int(c): [it["caption"] for it in items if int(it["label"]) == int(c)] or [""]
                            for c in conditions["label"].unique()}
                captions = [by_label[int(c)][i % len(by_label[int(c)])] for i, c in enumerate(conditions["label"])]
            else:
                captions = [it["caption"] for it in items[:n]]
                n = len(captions)
            conditions["caption"] = captions
        return conditions, n
