"""The data order: a permutation per epoch from (seed, epoch), resumable mid-epoch and split across ranks.

Every rank computes the same permutation and cuts it into global batches of `batch_size * world_size`
items; rank r takes the r-th block of `batch_size` of each. So W ranks with batch B see the global
batches that one process with batch W * B would, and no item is seen by two ranks in an epoch. With
gradient accumulation over N batches an epoch holds whole optimizer steps (a multiple of N global
batches), so accumulating N batches of B sees the items that one step of batch N * B would.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch.utils.data import Sampler


class EpochShuffle(Sampler[int]):
    """Epoch e visits the items in the permutation drawn from (seed, e); Lightning calls `set_epoch`.

    `resume_at(epoch, items_done)` makes the next pass start where an interrupted one stopped (items_done
    counts the items of the permutation used by all ranks), so a resumed run sees exactly the batches an
    uninterrupted one would. The items after the last whole optimizer step (`accumulate` global batches) are
    dropped, as with `drop_last`.
    """

    def __init__(self, size: int, seed: int = 0, batch_size: int = 1, rank: int = 0, world_size: int = 1,
                 accumulate: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not one of the {world_size} ranks")
        self.size, self.seed = size, seed
        self.batch_size, self.rank, self.world_size, self.accumulate = batch_size, rank, world_size, accumulate
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.skip = epoch, 0

    def resume_at(self, epoch: int, items_done: int) -> None:
        self.epoch, self.skip = epoch, items_done

    def permutation(self, epoch: int) -> torch.Tensor:
        seed = int(np.random.SeedSequence([self.seed, epoch]).generate_state(1)[0])
        return torch.randperm(self.size, generator=torch.Generator().manual_seed(seed))

    def __iter__(self):
        order = self.permutation(self.epoch)[self.skip:]
        self.skip = 0
        global_batch = self.batch_size * self.world_size
        step = global_batch * self.accumulate  # the items of one optimizer step
        whole = len(order) // step * step
        # (global batches, ranks, batch): this rank's block of every global batch
        blocks = order[:whole].view(-1, self.world_size, self.batch_size)[:, self.rank]
        return iter(blocks.flatten().tolist())

    def __len__(self) -> int:
        return self.size // (self.batch_size * self.world_size * self.accumulate) * self.accumulate * self.batch_size


class BatchShard(Sampler[int]):
    """A fixed order cut into batches of `batch_size`; rank r takes batches r, r + W, r + 2W, ... (none twice).

    Ranks may get one batch more than others (and only the last batch is short); every rank gets at least one.
    """

    def __init__(self, size: int, batch_size: int, rank: int = 0, world_size: int = 1):
        batches = math.ceil(size / batch_size)
        if batches < world_size:
            raise ValueError(f"{size} items make {batches} batches of {batch_size}, fewer than the {world_size} "
                             "ranks: every rank needs at least one")
        self.size, self.batch_size, self.rank, self.world_size = size, batch_size, rank, world_size

    def __iter__(self):
        for start in range(self.rank * self.batch_size, self.size, self.batch_size * self.world_size):
            yield from range(start, min(start + self.batch_size, self.size))

    def __len__(self) -> int:
        starts = range(self.rank * self.batch_size, self.size, self.batch_size * self.world_size)
        return sum(min(self.batch_size, self.size - start) for start in starts)
