"""The features that KID and the k-NN metrics need, kept per side and gathered from every rank ("cat" states)."""

from __future__ import annotations

import torch
from torchmetrics import Metric


class KeptFeatures(Metric):
    """Counts every sample; keeps the first `max_per_rank` features of each side on each rank.

    `reference` (set by the suite) holds real features from the reference cache: every rank has the same
    copy, so it is not synced, and `compute` puts it before the real features seen."""

    full_state_update = False

    def __init__(self, max_per_rank: int, **kwargs):
        super().__init__(**kwargs)
        self.max_per_rank = max_per_rank
        self.reference: torch.Tensor | None = None
        self.add_state("real_features", default=[], dist_reduce_fx="cat")
        self.add_state("fake_features", default=[], dist_reduce_fx="cat")
        self.add_state("num_real", default=torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("num_fake", default=torch.tensor(0), dist_reduce_fx="sum")

    def update(self, features: torch.Tensor, real: bool) -> None:
        kept = self.real_features if real else self.fake_features
        room = self.max_per_rank - sum(len(chunk) for chunk in kept)
        # float32 as the networks give them: half the memory of float64, and distances are taken in float64;
        # a full side still gets an empty (0, D) chunk, so no rank syncs an empty list (torchmetrics would
        # stand in a 1-d tensor that other ranks' 2-d features cannot be gathered with)
        kept.append(features[:max(room, 0)].detach().float())
        if real:
            self.num_real += len(features)
        else:
            self.num_fake += len(features)

    def compute(self) -> dict[str, torch.Tensor]:
        """real (M, D) and fake (N, D) features of all ranks (the reference first), and the samples seen per side."""
        real = [chunk for chunk in (self.reference, _cat(self.real_features)) if chunk is not None and chunk.numel()]
        return {"real": torch.cat([chunk.to(self.device) for chunk in real]) if real else torch.zeros(0, 0),
                "fake": _cat(self.fake_features), "num_real": self.num_real, "num_fake": self.num_fake}


def _cat(state) -> torch.Tensor:
    # a list before syncing (one process), one tensor after (torchmetrics concatenates "cat" states)
    if isinstance(state, torch.Tensor):
        return state
    return torch.cat(state) if state else torch.zeros(0, 0)
