"""One conditioner holds a list of embedders and assembles their outputs into a `Conditioning`."""

from __future__ import annotations

import torch
from torch import nn

from ldm.conditioners.embedder import Embedder
from ldm.contracts.batch import cached_outputs
from ldm.contracts.conditioning import Conditioning
from ldm.utils.noise import rand


class Conditioner(nn.Module):
    """Runs each embedder on its batch key and applies condition dropout for classifier-free guidance.

    Vectors of several embedders are concatenated (B, sum D); tokens are concatenated along the
    sequence (B, sum L, D). `vector_dim` and `context_dim` are declared in the config (the
    denoiser's config reads them) and checked here against what the embedders produce.
    """

    def __init__(self, embedders: list[Embedder] | None = None, vector_dim: int | None = None,
                 context_dim: int | None = None, drop_rate: float = 0.0):
        super().__init__()
        if not 0.0 <= drop_rate <= 1.0:
            raise ValueError(f"conditioner.drop_rate must be in [0, 1], got {drop_rate}")
        # drop_rate drops the whole condition at once (what guidance's unconditional branch sees);
        # each embedder's own drop_rate drops its part alone on top of that
        self.drop_rate = drop_rate
        self.embedders = nn.ModuleList(embedders or [])
        self.vector_dim = vector_dim
        self.context_dim = context_dim
        for embedder in self.embedders:
            embedder.freeze_if_needed()
        self.provides = frozenset(out for e in self.embedders for out in e.outputs)
        for name, dim in (("vector", vector_dim), ("tokens", context_dim)):
            if (name in self.provides) != (dim is not None):
                key = "vector_dim" if name == "vector" else "context_dim"
                raise ValueError(f"conditioner.{key} is {dim} but the embedders "
                                 f"{'do' if name in self.provides else 'do not'} produce Conditioning.{name}")

    @property
    def input_keys(self) -> list[str]:
        return [e.input_key for e in self.embedders]

    def frozen_parts(self) -> dict[str, nn.Module]:
        """Embedders whose weights never change in training, by their name in this module."""
        return {f"embedders.{i}": e for i, e in enumerate(self.embedders) if not e.trainable}

    def _bernoulli(self, rate: float, batch_size: int, device, generator: torch.Generator | None) -> torch.Tensor:
        if not self.training or rate <= 0:
            return torch.zeros(batch_size, dtype=torch.bool, device=device)
        return rand(batch_size, generator, device) < rate

    def _embed(self, index: int, embedder: Embedder, batch: dict) -> dict[str, torch.Tensor]:
        cached = cached_outputs(batch, index, embedder.outputs)
        if cached:
            return cached
        if embedder.input_key not in batch:
            name = f"conditioner.embedders.{index} ({type(embedder).__name__})"
            raise KeyError(f"{name} reads batch['{embedder.input_key}'], but the batch only has {sorted(batch)}: "
                           "pick a conditioner that fits the data")
        return embedder(batch[embedder.input_key])

    def forward(self, batch: dict, force_drop: bool = False, generator: torch.Generator | None = None
                ) -> Conditioning:
        """Encode a batch; `force_drop=True` gives the unconditional (null) condition for guidance."""
        parts: dict[str, list[torch.Tensor]] = {"vector": [], "tokens": [], "token_mask": [], "concat": []}
        whole = None
        for index, embedder in enumerate(self.embedders):
            outputs = self._embed(index, embedder, batch)
            first = next(iter(outputs.values()))
            size, device = first.shape[0], first.device
            if whole is None:
                whole = self._bernoulli(self.drop_rate, size, device, generator)
            if force_drop:
                drop = torch.ones(size, dtype=torch.bool, device=device)
            else:
                drop = whole | self._bernoulli(embedder.drop_rate, size, device, generator)
            if drop.any():
                null = embedder.null(size, device)
                outputs = {k: torch.where(drop.view(-1, *[1] * (v.dim() - 1)), null[k].to(v.dtype), v)
                           for k, v in outputs.items()}
            if "tokens" in outputs:
                # None: an embedder whose tokens are all attended (filled in below if another one masks)
                parts["token_mask"].append(outputs.pop("token_mask", None))
            for key, value in outputs.items():
                parts[key].append(value)
        if all(mask is None for mask in parts["token_mask"]):
            parts["token_mask"] = []
        else:
            parts["token_mask"] = [
                torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device) if mask is None else mask
                for mask, tokens in zip(parts["token_mask"], parts["tokens"], strict=True)]
        out = Conditioning(
            vector=torch.cat(parts["vector"], dim=-1) if parts["vector"] else None,
            tokens=torch.cat(parts["tokens"], dim=1) if parts["tokens"] else None,
            token_mask=torch.cat(parts["token_mask"], dim=1) if parts["token_mask"] else None,
            concat=torch.cat(parts["concat"], dim=1) if parts["concat"] else None,
        )
        self._check_dim("vector_dim", self.vector_dim, out.vector)
        self._check_dim("context_dim", self.context_dim, out.tokens)
        return out

    def _check_dim(self, name: str, declared: int | None, value: torch.Tensor | None) -> None:
        if value is not None and declared != value.shape[-1]:
            raise ValueError(f"conditioner.{name} is {declared} but its embedders produce "
                             f"{value.shape[-1]}; set it to {value.shape[-1]}")
