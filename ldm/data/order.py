"""The training data order: a permutation per epoch from (seed, epoch), resumable mid-epoch."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Sampler


class EpochShuffle(Sampler[int]):
    """Epoch e visits the items in the permutation drawn from (seed, e); Lightning calls `set_epoch`.

    `resume_at(epoch, items_done)` makes the next pass start where an interrupted one stopped, so a
    resumed run sees exactly the batches an uninterrupted one would.
    """

    def __init__(self, size: int, seed: int = 0):
        self.size, self.seed = size, seed
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
        return iter(order.tolist())

    def __len__(self) -> int:
        return self.size
