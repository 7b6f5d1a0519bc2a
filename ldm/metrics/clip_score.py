"""CLIP score (Hessel et al. 2021, as torchmetrics defines it): 100 * max(cos(image, caption), 0), averaged.

torchmetrics' CLIPScore needs a transformers CLIP from the hub; this one takes embeddings from any
CLIP (the suite's open_clip backend), and syncs its sums across ranks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchmetrics import Metric


class ClipScore(Metric):
    """`update(image_embeddings, text_embeddings)` with (N, D) pairs; `compute()` the mean score."""

    full_state_update = False
    higher_is_better = True

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("score_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0), dist_reduce_fx="sum")

    def update(self, image_embeddings: torch.Tensor, text_embeddings: torch.Tensor) -> None:
        if image_embeddings.shape != text_embeddings.shape:
            raise ValueError(f"{len(image_embeddings)} image and {len(text_embeddings)} caption embeddings "
                             f"({tuple(image_embeddings.shape)} vs {tuple(text_embeddings.shape)}): give one caption "
                             "per image")
        cosine = F.cosine_similarity(image_embeddings.double(), text_embeddings.double(), dim=-1)
        self.score_sum += (100 * cosine.clamp(min=0)).sum()
        self.count += len(cosine)

    def compute(self) -> torch.Tensor:
        return self.score_sum / self.count
