"""The LightningDataModule shared by every data set: loaders plus what the rest of the app asks of data."""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset


class DataModule(L.LightningDataModule):
    """Wraps a train and a validation dataset whose items are dicts (`image`, and `label`/`caption`/...)."""

    def __init__(self, train: Dataset, val: Dataset, batch_size: int = 128, num_workers: int = 0,
                 num_classes: int | None = None, val_batch_size: int | None = None, cache: bool = False,
                 cache_dir: str = ".cache/ldm", **shared):
        # `shared` holds the values the data config states once for its datasets and for other groups
        # (image_size, channels, seed, root, ...): the datasets arrive built, so nothing here reads them
        super().__init__()
        self.cache, self.cache_dir = cache, cache_dir
        self.train_set, self.val_set = train, val
        self.num_classes = num_classes
        self.batch_size, self.num_workers = batch_size, num_workers
        self.val_batch_size = val_batch_size or batch_size
        self._grids: dict[int, tuple[dict, int]] = {}

    def attach_cache(self, autoencoder, conditioner, data_config: dict, device="cpu") -> None:
        """With `cache: true`, swap both splits for their cached versions (built once, then read)."""
        if not self.cache:
            return
        from ldm.data.cache import cached_dataset

        self.train_set, self.val_set = (
            cached_dataset(dataset, split, data_config, autoencoder, conditioner, self.cache_dir, device=device)
            for dataset, split in ((self.train_set, "train"), (self.val_set, "val"))
        )
        self._grids.clear()

    def _loader(self, dataset: Dataset, batch_size: int, shuffle: bool) -> DataLoader:
        return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=shuffle,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
                          pin_memory=torch.cuda.is_available())

    def train_dataloader(self) -> DataLoader:
        if len(self.train_set) < self.batch_size:
            raise ValueError(f"the training set has {len(self.train_set)} items, fewer than "
                             f"data.batch_size={self.batch_size}")
        return self._loader(self.train_set, self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, self.val_batch_size, shuffle=False)

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
