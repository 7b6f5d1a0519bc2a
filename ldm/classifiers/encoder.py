"""A noise-conditional classifier of latents: the encoder half of ADM's UNet, small.

ADM's guidance classifier (Dhariwal & Nichol 2021) is its UNet's downsampling path with the time embedding in
every residual block, pooled to class logits. Here: a stem convolution, `num_res_blocks` time-modulated
ResBlocks per level of `channel_mult` (halving the resolution between levels), GroupNorm, SiLU, global average
pool, linear. It reads what the diffusion network reads: the schedule's `model_input(x_t, t)`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ldm.models.layers import TimestepEmbedder
from ldm.models.unet import Downsample, ResBlock, group_norm


class NoisyClassifier(nn.Module):
    """`classifier(x_in, t_in) -> (B, num_classes)` logits of p(y | x_t)."""

    def __init__(self, in_channels: int, num_classes: int, channels: int = 64, channel_mult: Sequence[int] = (1, 2),
                 num_res_blocks: int = 1, time_scale: float = 1000.0, dropout: float = 0.0):
        super().__init__()
        emb_dim = 4 * channels
        self.time_embed = TimestepEmbedder(emb_dim, channels, time_scale)
        self.stem = nn.Conv2d(in_channels, channels, 3, padding=1)
        blocks, width = [], channels
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                blocks.append(ResBlock(width, channels * mult, emb_dim, dropout))
                width = channels * mult
            if level < len(channel_mult) - 1:
                blocks.append(Downsample(width))
        self.blocks = nn.ModuleList(blocks)
        self.out = nn.Sequential(group_norm(width), nn.SiLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                 nn.Linear(width, num_classes))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        emb = self.time_embed(t)
        h = self.stem(x)
        for block in self.blocks:
            h = block(h, emb)
        return self.out(h)
