"""`finetune=partial`: only the parameters of the targeted modules train; the rest is a frozen base.

E.g. `finetune.targets=[attention]`, `[adaln]` (the DiT's modulations) or `['blocks\\.[45]']` (its last two
blocks); see ldm.finetune.targets. Checkpoints hold the trained parameters only, the base is referenced by hash.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from ldm.finetune.targets import matched_modules


class Partial:
    has_base = True

    def __init__(self, targets: Sequence[str] | None = None):
        self.targets = list(targets) if targets else None

    def apply(self, denoiser: nn.Module) -> None:
        modules = dict(denoiser.named_modules())
        denoiser.requires_grad_(False)
        for name in matched_modules(denoiser, self.targets):
            modules[name].requires_grad_(True)
