"""Class labels to a learned vector, with a null class for classifier-free guidance."""

from __future__ import annotations

import difflib

import torch
from torch import nn

from ldm.conditioners.embedder import Embedder
from ldm.weights.dit import read_class_table
from ldm.weights.files import WeightsError


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet class names by index, as torchvision ships them (no download)."""
    from torchvision.models import ResNet50_Weights  # deferred: torchvision loads only for class names

    return list(ResNet50_Weights.IMAGENET1K_V1.meta["categories"])


CLASS_NAMES = {"imagenet": imagenet_class_names}


def class_indices(labels: list[int | str], names: list[str]) -> list[int]:
    """Class indices for labels given as indices or names (case-insensitive), e.g. ["goldfish", 207]."""
    lookup: dict[str, list[int]] = {}
    for index, name in enumerate(names):
        lookup.setdefault(name.lower(), []).append(index)
    indices, problems = [], []
    for label in labels:
        if not isinstance(label, str):
            indices.append(int(label))
            continue
        found = lookup.get(label.strip().lower(), [])
        if len(found) == 1:
            indices.append(found[0])
        elif found:
            problems.append(f"{label!r} names the classes {found}: give the index")
        else:
            close = difflib.get_close_matches(label.lower(), lookup, n=3)
            problems.append(f"{label!r} is not a class name" + (f" (close: {', '.join(close)})" if close else ""))
    if problems:
        raise ValueError("; ".join(problems))
    return indices


class ClassEmbedder(Embedder):
    """A table of num_classes + 1 vectors, the null class last (the layout of DiT's class table).

    `weights`: a DiT file (ldm.weights.dit) whose class table to start from. `class_names`: the key
    of a known list of names (`CLASS_NAMES`, e.g. "imagenet"), for `class_indices`.
    """

    fields_supported = ("vector",)
    offline = False

    def __init__(self, num_classes: int, embed_dim: int, input_key: str = "label", drop_rate: float = 0.1,
                 trainable: bool = True, weights: str | None = None, class_names: str | None = None):
        super().__init__(input_key, "vector", trainable, drop_rate)
        if class_names is not None and class_names not in CLASS_NAMES:
            raise ValueError(f"class_names must be one of {', '.join(CLASS_NAMES)} or null, got {class_names!r}")
        self.num_classes = num_classes
        self.class_names = class_names
        # the extra row (index num_classes) is the null class used for dropped / unconditional samples
        self.embedding = nn.Embedding(num_classes + 1, embed_dim)
        nn.init.normal_(self.embedding.weight, std=0.02)
        if weights:
            self.load_table(weights)

    def load_table(self, path: str) -> None:
        table = read_class_table(path)
        rows, width = self.embedding.weight.shape
        if table.shape != (rows, width):
            raise WeightsError(
                f"weights={path}: the class table is {tuple(table.shape)} but the class embedder is ({rows}, {width}) "
                f"(num_classes + 1 rows, the null class last): set num_classes={table.shape[0] - 1} and "
                f"embed_dim / conditioner.vector_dim={table.shape[1]}")
        with torch.no_grad():
            self.embedding.weight.copy_(table)

    def forward(self, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        labels = torch.as_tensor(labels, device=self.embedding.weight.device).long()
        if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(f"labels must be in [0, {self.num_classes}), got {labels.min()}..{labels.max()}")
        return {"vector": self.embedding(labels)}

    def null(self, batch_size: int, device) -> dict[str, torch.Tensor]:
        index = torch.full((batch_size,), self.num_classes, device=device, dtype=torch.long)
        return {"vector": self.embedding(index)}
