"""Class labels to a learned vector, with a null class for classifier-free guidance."""

from __future__ import annotations

import torch
from torch import nn

from ldm.conditioners.embedder import Embedder


class ClassEmbedder(Embedder):
    fields_supported = ("vector",)
    offline = False

    def __init__(self, num_classes: int, embed_dim: int, input_key: str = "label", drop_rate: float = 0.1,
                 trainable: bool = True):
        super().__init__(input_key, "vector", trainable, drop_rate)
        self.num_classes = num_classes
        # the extra row (index num_classes) is the null class used for dropped / unconditional samples
        self.embedding = nn.Embedding(num_classes + 1, embed_dim)
        nn.init.normal_(self.embedding.weight, std=0.02)

    def forward(self, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        labels = torch.as_tensor(labels, device=self.embedding.weight.device).long()
        if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(f"labels must be in [0, {self.num_classes}), got {labels.min()}..{labels.max()}")
        return {"vector": self.embedding(labels)}

    def null(self, batch_size: int, device) -> dict[str, torch.Tensor]:
        index = torch.full((batch_size,), self.num_classes, device=device, dtype=torch.long)
        return {"vector": self.embedding(index)}
