"""Layers shared by the denoisers: timestep embedding, attention, adaLN modulation, feed-forward."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint


def zero_init(module: nn.Module) -> nn.Module:
    """Zero a module's parameters, so that a residual branch starts as the identity."""
    for parameter in module.parameters():
        nn.init.zeros_(parameter)
    return module


def run_layer(layer: nn.Module, *args, checkpointing: bool = False):
    """Call `layer`, recomputing its activations in backward when checkpointing while training."""
    if checkpointing and layer.training and torch.is_grad_enabled():
        return checkpoint(layer, *args, use_reentrant=False)
    return layer(*args)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0,
                       frequency_shift: float = 0.0) -> torch.Tensor:
    """Sinusoidal embedding (B,) -> (B, dim), [cos | sin], in float32: frequencies max_period^(-i / (half - shift)).

    Shift 0 is the transformer's position encoding (and the published DiT code); diffusers' DiT uses 1.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32)
                      / (half - frequency_shift))
    args = t.float()[:, None] * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = F.pad(embedding, (0, 1))
    return embedding


class TimestepEmbedder(nn.Module):
    """t -> sinusoidal features of `t * time_scale` -> MLP to `dim`.

    The scale maps t in [0, 1] to DDPM's step range, where the sinusoid frequencies were designed
    (1 for a time input that already is the level k); `frequency_shift` as in `timestep_embedding`.
    """

    def __init__(self, dim: int, frequency_dim: int = 256, time_scale: float = 1000.0,
                 frequency_shift: float = 0.0):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.time_scale = time_scale
        self.frequency_shift = frequency_shift
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        features = timestep_embedding(t * self.time_scale, self.frequency_dim, frequency_shift=self.frequency_shift)
        return self.mlp(features.to(self.mlp[0].weight.dtype))


def vector_embedder(vector_dim: int, dim: int) -> nn.Module:
    """Projects Conditioning.vector to the embedding width; no layer when the widths already agree."""
    return nn.Identity() if vector_dim == dim else nn.Linear(vector_dim, dim)


def broadcast_time(t: torch.Tensor | float, batch_size: int, device) -> torch.Tensor:
    """Accept t as (B,), a one-element tensor or a float; return a (B,) tensor."""
    t = torch.as_tensor(t, device=device)
    if t.numel() == 1:
        t = t.reshape(1).expand(batch_size)
    if t.shape != (batch_size,):
        raise ValueError(f"t must have shape ({batch_size},), got {tuple(t.shape)}")
    return t


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x (B, N, D) scaled and shifted per sample by (B, 1, D) modulations."""
    return x * (1 + scale) + shift


class AdaLNModulation(nn.Module):
    """Regresses `num_chunks` per-sample (B, 1, dim) modulations from the conditioning embedding.

    Zero-initialized (adaLN-Zero): shifts, scales and gates all start at 0.
    """

    def __init__(self, cond_dim: int, dim: int, num_chunks: int):
        super().__init__()
        self.num_chunks = num_chunks
        self.proj = zero_init(nn.Linear(cond_dim, num_chunks * dim))

    def forward(self, c: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.proj(F.silu(c)).unsqueeze(1).chunk(self.num_chunks, dim=-1)


class Attention(nn.Module):
    """Multi-head attention via scaled_dot_product_attention: self-attention, or cross-attention to a
    context of width `context_dim` with an optional key mask (B, L), True = attend."""

    def __init__(self, dim: int, num_heads: int, context_dim: int | None = None, qkv_bias: bool = True,
                 zero_out: bool = False):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"attention width {dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.to_q = nn.Linear(dim, dim, bias=qkv_bias)
        self.to_kv = nn.Linear(context_dim or dim, 2 * dim, bias=qkv_bias)
        self.to_out = nn.Linear(dim, dim)
        if zero_out:
            zero_init(self.to_out)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        q = rearrange(self.to_q(x), "b n (h d) -> b h n d", h=self.num_heads)
        k, v = rearrange(self.to_kv(context), "b l (two h d) -> two b h l d", two=2, h=self.num_heads)
        attn_mask = None
        if mask is not None:
            mask = mask.bool()
            # a sample whose keys are all masked would get NaN weights; let it attend anywhere and
            # zero its output below, so it behaves as "no context"
            has_keys = mask.any(dim=-1)
            attn_mask = (mask | ~has_keys[:, None])[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        if mask is not None:
            out = out * has_keys[:, None, None, None].to(out.dtype)
        return self.to_out(rearrange(out, "b h n d -> b n (h d)"))


class GEGLU(nn.Module):
    """Gated GELU projection (Shazeer, 2020): a * gelu(b) of one linear layer's two halves."""

    def __init__(self, dim: int, inner_dim: int):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * inner_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    """Transformer MLP: GEGLU (`glu=True`) or Linear + tanh-GELU, then Linear back to `dim`."""

    def __init__(self, dim: int, mult: float = 4.0, glu: bool = False, dropout: float = 0.0):
        super().__init__()
        inner_dim = int(dim * mult)
        project_in = GEGLU(dim, inner_dim) if glu else nn.Sequential(
            nn.Linear(dim, inner_dim), nn.GELU(approximate="tanh"))
        self.net = nn.Sequential(project_in, nn.Dropout(dropout), nn.Linear(inner_dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
