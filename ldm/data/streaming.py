"""Training from litdata shards (`data.cache=stream`): sharded over ranks and workers, resumable mid-epoch.

litdata is Lightning's own streaming format, and the reason it is used over webdataset and
mosaicml-streaming: its loader has the `state_dict` / `load_state_dict` that Lightning checkpoints
(exact mid-epoch resume, with rank and worker counts recorded), it splits chunks over ranks and
workers itself, it reads local shards in place by mmap, and it needs no second dependency stack.
webdataset has no resumable position (a restarted epoch repeats or skips items), and
mosaicml-streaming resumes but brings its own shared-memory process model and launcher conventions.

Each epoch permutes the chunks and the items inside each chunk from (run seed, epoch); which
cached variant of an item (e.g. flipped or not) a step sees is a function of (seed, epoch, index),
so a resumed run draws the same ones. The position a checkpoint records is the number of batches
training finished, not how many the loader had prefetched.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from litdata import StreamingDataLoader, StreamingDataset

from ldm.contracts.batch import LATENT_MEAN
from ldm.data.datamodule import DataModule
from ldm.data.shards import INDEX_KEY, Shards, shard_cache
from ldm.utils.errors import ConfigError

STREAM = "stream"
STATE_KEY = "stream"  # the training loader's litdata state, in the datamodule's checkpoint entry


def variant_choice(seed: int, epoch: int, index: int, num_variants: int) -> int:
    """Which stored variant item `index` shows in `epoch`: uniform, and the same in a resumed run."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0] % num_variants)


class LatentShards(StreamingDataset):
    """A shard directory's items, each with one of its stored variants (keys of shape (num_variants, ...))."""

    def __init__(self, shards: Shards, shuffle: bool, seed: int = 0, drop_last: bool | None = None):
        # item_shuffle_window=0: a full permutation inside each chunk (reads are mmapped, any order is cheap)
        super().__init__(str(shards.directory), shuffle=shuffle, seed=seed, drop_last=drop_last,
                         item_shuffle_window=0)
        self.variant_keys = shards.variant_keys

    def __getitem__(self, index):
        item = super().__getitem__(index)
        if not isinstance(item, dict) or LATENT_MEAN not in item:
            return item
        variants = item[LATENT_MEAN].shape[0]
        variant = variant_choice(self.seed, self.current_epoch, int(item[INDEX_KEY]), variants) if variants > 1 else 0
        return {key: value[variant] if key in self.variant_keys else value for key, value in item.items()}


class ResumableLoader(StreamingDataLoader):
    """litdata's loader whose `state_dict` counts the batches `batches_done()` reports as consumed.

    Lightning fetches a batch ahead of the one it trains on, so the loader's own count is one batch
    too far at a checkpoint; a run resumed from it would skip that batch."""

    def __init__(self, dataset: StreamingDataset, batches_done: Callable[[], int | None] | None = None, **kwargs):
        super().__init__(dataset, **kwargs)
        self.batches_done = batches_done
        self._resumed_pass_started = False

    def __iter__(self):
        # litdata ends a resumed pass only when it runs out, but Lightning stops at the epoch's length
        # without asking for more: a second pass begun while still resuming is the next epoch
        if self.restore and self._resumed_pass_started:
            self.restore = False
        self._resumed_pass_started = self.restore
        yield from super().__iter__()

    def state_dict(self) -> dict:
        done = self.batches_done() if self.batches_done is not None else None
        if done is None:
            return super().state_dict()
        samples = done * self.batch_size
        return {
            "dataset": self.dataset.state_dict(samples, self.num_workers, self.batch_size),
            "current_epoch": self.current_epoch,
            "num_samples_yielded": samples,
            # batches come from the workers in turn: batch j from worker j % num_workers
            "latest_worker_idx": (done - 1) % max(self.num_workers, 1) if done else 0,
        }


class StreamingDataModule(DataModule):
    """The shared DataModule, plus `cache: stream`: both splits cached as litdata shards and streamed.

    `global_batch_size`, when set, replaces `batch_size`: each of the run's processes then loads
    global_batch_size / world_size items per step (DiT's --global-batch-size)."""

    def __init__(self, train, val, image_size: int, channels: int, num_classes: int | None = None,
                 batch_size: int = 128, num_workers: int = 0, val_batch_size: int | None = None,
                 cache: bool | str = STREAM, cache_dir: str = ".cache/ldm", seed: int | None = None,
                 root: str | None = None, val_fraction: float | None = None, flip: bool = False,
                 global_batch_size: int | None = None):
        if cache not in (False, True, STREAM):
            raise ConfigError([f"data.cache={cache!r}: use {STREAM} (litdata shards on disk, streamed), true (in "
                               "memory) or false (encode every step)"])
        if global_batch_size is not None and (not isinstance(global_batch_size, int) or global_batch_size < 1):
            raise ConfigError([f"data.global_batch_size={global_batch_size!r} must be a positive whole number "
                               "(or null to use data.batch_size per process)"])
        super().__init__(train, val, image_size, channels, num_classes=num_classes, batch_size=batch_size,
                         num_workers=num_workers, val_batch_size=val_batch_size, cache=cache, cache_dir=cache_dir,
                         seed=seed, root=root, val_fraction=val_fraction, flip=flip)
        self.global_batch_size = global_batch_size
        self.shards: dict[str, Shards] = {}
        self._train_loader: ResumableLoader | None = None
        self._stream_state: dict | None = None

    def attach_cache(self, autoencoder, conditioner, data_config: dict, device="cpu") -> None:
        """With `cache: stream`, write (once) or find both splits' shards; the datasets stay for metadata."""
        if self.cache != STREAM:
            return super().attach_cache(autoencoder, conditioner, data_config, device)
        self.shards = {split: shard_cache(dataset, split, data_config, autoencoder, conditioner, self.cache_dir,
                                          num_workers=self.num_workers, device=device)
                       for dataset, split in ((self.train_set, "train"), (self.val_set, "val"))}

    def per_process_batch_size(self) -> int:
        if self.global_batch_size is None:
            return self.batch_size
        world_size = self.trainer.world_size if self.trainer is not None else 1
        if self.global_batch_size % world_size:
            raise ConfigError([f"data.global_batch_size={self.global_batch_size} does not split evenly over "
                               f"{world_size} processes: use a multiple of {world_size}"])
        return self.global_batch_size // world_size

    def _batches_done(self) -> int | None:
        """Training batches finished in this epoch, as Lightning counts them (None outside a fit)."""
        if self.trainer is None:
            return None
        return self.trainer.fit_loop.epoch_loop.batch_progress.current.processed

    def train_dataloader(self):
        self.batch_size = self.per_process_batch_size()
        if "train" not in self.shards:
            return super().train_dataloader()
        # built here, not in attach_cache: litdata reads the rank and world size when the dataset is made
        dataset = LatentShards(self.shards["train"], shuffle=True, seed=self.shuffle_seed, drop_last=True)
        loader = ResumableLoader(dataset, batches_done=self._batches_done, batch_size=self.batch_size,
                                 num_workers=self.num_workers, drop_last=True, pin_memory=torch.cuda.is_available())
        if len(loader) == 0:
            raise ConfigError([f"data.batch_size={self.batch_size}: the training set has {self.shards['train'].length} "
                               "items, fewer than one batch for each process; use a smaller batch"])
        if self._stream_state is not None:
            loader.load_state_dict(self._stream_state)
            self._stream_state = None
        elif self.trainer is not None:  # the loader counts epochs from 1 at its first pass
            loader.current_epoch = self.trainer.current_epoch
        self._train_loader = loader
        return loader

    def val_dataloader(self):
        if "val" not in self.shards:
            return super().val_dataloader()
        dataset = LatentShards(self.shards["val"], shuffle=False, seed=self.shuffle_seed)
        return StreamingDataLoader(dataset, batch_size=self.val_batch_size, num_workers=self.num_workers,
                                   pin_memory=torch.cuda.is_available())

    def _grid_conditions(self, per_row: int, rows: int = 8) -> tuple[dict, int]:
        # one row per class would be 8000 samples for ImageNet: `rows` classes spread over the range instead
        if not self.num_classes or self.num_classes <= rows:
            return super()._grid_conditions(per_row, rows)
        classes = torch.arange(rows) * self.num_classes // rows
        return {"label": classes.repeat_interleave(per_row)}, rows * per_row

    def state_dict(self) -> dict:
        if self._train_loader is None:
            return super().state_dict()
        return {STATE_KEY: self._train_loader.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if STATE_KEY in state:
            self._stream_state = state[STATE_KEY]
        else:
            super().load_state_dict(state)
