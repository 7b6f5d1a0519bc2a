"""`finetune=full`: every parameter trains and checkpoints hold the whole network (the project's default)."""

from __future__ import annotations

from torch import nn


class Full:
    """Nothing frozen, nothing added."""

    has_base = False  # no frozen base to reference: the checkpoints hold every weight

    def apply(self, denoiser: nn.Module) -> None:
        return None
