"""Base class of one condition encoder inside a `Conditioner`."""

from __future__ import annotations

import torch
from torch import nn

from ldm.contracts.conditioning import FIELDS


class Embedder(nn.Module):
    """Reads `batch[input_key]` and fills one or more `Conditioning` fields.

    Subclasses implement `forward(inputs) -> {field: Tensor}` and `null(batch_size, device)`, the
    condition that replaces a dropped sample (null class, empty prompt). The conditioner does the
    dropping, so a frozen embedder's outputs can be computed offline and cached.
    """

    #: fields an embedder of this kind can fill
    fields_supported: tuple[str, ...] = FIELDS
    #: an encoder whose outputs the offline cache can store (False for a learned lookup like class labels,
    #: which is part of the model being trained)
    offline: bool = True

    def __init__(self, input_key: str, fields: str | list[str], trainable: bool = True, drop_rate: float = 0.0):
        super().__init__()
        self.fields = (fields,) if isinstance(fields, str) else tuple(fields)
        for field in self.fields:
            if field not in self.fields_supported:
                raise ValueError(
                    f"{type(self).__name__} cannot fill Conditioning.{field}; it fills {self.fields_supported}"
                )
        if not 0.0 <= drop_rate <= 1.0:
            raise ValueError(f"drop_rate must be in [0, 1], got {drop_rate}")
        self.input_key = input_key
        self.trainable = trainable
        self.drop_rate = drop_rate

    @property
    def outputs(self) -> tuple[str, ...]:
        """Keys of `forward`'s dict: the fields, plus token_mask beside tokens."""
        return self.fields + (("token_mask",) if "tokens" in self.fields else ())

    def freeze_if_needed(self) -> None:
        if not self.trainable:
            self.requires_grad_(False)
            self.eval()

    def train(self, mode: bool = True):
        # a frozen encoder stays in eval mode (no dropout, fixed norms) whatever its parent does
        return super().train(mode and self.trainable)

    def forward(self, inputs) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def null(self, batch_size: int, device) -> dict[str, torch.Tensor]:
        raise NotImplementedError
