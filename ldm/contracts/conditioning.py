"""The `Conditioning` bundle that conditioners produce and denoisers consume."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

FIELDS = ("vector", "tokens", "token_mask", "concat")


@dataclass
class Conditioning:
    """Optional fields: vector (B, D), tokens (B, L, D), token_mask (B, L) bool, concat (B, C, H, W)."""

    vector: torch.Tensor | None = None
    tokens: torch.Tensor | None = None
    token_mask: torch.Tensor | None = None
    concat: torch.Tensor | None = None

    def present(self) -> frozenset[str]:
        return frozenset(f.name for f in fields(self) if getattr(self, f.name) is not None)

    def map(self, fn) -> Conditioning:
        """Apply `fn` to every tensor field (e.g. repeat, index, move to a device)."""
        return replace(self, **{name: fn(getattr(self, name)) for name in self.present()})

    @staticmethod
    def cat(parts: list[Conditioning]) -> Conditioning:
        """Concatenate along the batch dimension (used to batch the two halves of guidance)."""
        names = parts[0].present()
        if any(p.present() != names for p in parts):
            raise ValueError("cannot concatenate Conditionings with different fields present")
        return Conditioning(**{n: torch.cat([getattr(p, n) for p in parts]) for n in names})
