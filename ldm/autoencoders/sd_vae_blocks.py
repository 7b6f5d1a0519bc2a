"""The layers of the LDM / Stable Diffusion KL autoencoder: ResNet blocks, one attention layer, encoder, decoder.

Both halves index their levels by resolution (level 0 is full resolution), so `encoder.down[l]` and
`decoder.up[l]` work at the same size; the decoder runs its levels from the last to the first.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

GROUPS = 32
EPS = 1e-6


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(GROUPS, channels, eps=EPS)


class ResnetBlock(nn.Module):
    """norm-SiLU-conv twice, plus the input (through a 1x1 conv when the width changes)."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.norm1, self.conv1 = group_norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2, self.conv2 = group_norm(c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return h + (x if self.skip is None else self.skip(x))


class SelfAttention(nn.Module):
    """Single-head self-attention over all H * W positions, with a residual connection."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = group_norm(channels)
        self.q, self.k, self.v, self.out = (nn.Linear(channels, channels) for _ in range(4))

    def forward(self, x):
        b, c, h, w = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # (B, H*W, C)
        q, k, v = (proj(tokens).unsqueeze(1) for proj in (self.q, self.k, self.v))  # (B, 1, H*W, C)
        attended = F.scaled_dot_product_attention(q, k, v).squeeze(1)
        return x + self.out(attended).transpose(1, 2).reshape(b, c, h, w)


class MidBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.res1, self.attn, self.res2 = ResnetBlock(channels, channels), SelfAttention(channels), \
            ResnetBlock(channels, channels)

    def forward(self, x):
        return self.res2(self.attn(self.res1(x)))


class Downsample(nn.Conv2d):
    """A stride-2 3x3 conv after padding one row and column at the bottom and right only."""

    def __init__(self, channels: int):
        super().__init__(channels, channels, 3, stride=2)

    def forward(self, x):
        return super().forward(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Conv2d):
    """Nearest-neighbour doubling, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__(channels, channels, 3, padding=1)

    def forward(self, x):
        return super().forward(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """The ResNet blocks of one resolution and the resampling that leaves it (None on the last)."""

    def __init__(self, blocks: list[ResnetBlock], resample: nn.Module | None, resample_name: str):
        super().__init__()
        self.res = nn.ModuleList(blocks)
        self.resample_name = resample_name
        setattr(self, resample_name, resample)

    def forward(self, x):
        for block in self.res:
            x = block(x)
        resample = getattr(self, self.resample_name)
        return x if resample is None else resample(x)


class Encoder(nn.Module):
    """Image (B, C, H, W) -> posterior moments (B, 2 * latent_channels, H / f, W / f)."""

    def __init__(self, in_channels: int, widths: list[int], num_res_blocks: int, latent_channels: int):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, widths[0], 3, padding=1)
        levels, previous = [], widths[0]
        for level, width in enumerate(widths):
            blocks = [ResnetBlock(previous if j == 0 else width, width) for j in range(num_res_blocks)]
            last = level == len(widths) - 1
            levels.append(Level(blocks, None if last else Downsample(width), "downsample"))
            previous = width
        self.down = nn.ModuleList(levels)
        self.mid = MidBlock(widths[-1])
        self.norm_out = group_norm(widths[-1])
        self.conv_out = nn.Conv2d(widths[-1], 2 * latent_channels, 3, padding=1)

    def forward(self, x):
        x = self.conv_in(x)
        for level in self.down:
            x = level(x)
        return self.conv_out(F.silu(self.norm_out(self.mid(x))))


class Decoder(nn.Module):
    """Latents (B, latent_channels, h, w) -> image (B, out_channels, h * f, w * f)."""

    def __init__(self, out_channels: int, widths: list[int], num_res_blocks: int, latent_channels: int):
        super().__init__()
        self.conv_in = nn.Conv2d(latent_channels, widths[-1], 3, padding=1)
        self.mid = MidBlock(widths[-1])
        levels = []
        for level, width in enumerate(widths):
            previous = widths[min(level + 1, len(widths) - 1)]  # the width of the level below, which runs first
            blocks = [ResnetBlock(previous if j == 0 else width, width) for j in range(num_res_blocks + 1)]
            levels.append(Level(blocks, None if level == 0 else Upsample(width), "upsample"))
        self.up = nn.ModuleList(levels)
        self.norm_out = group_norm(widths[0])
        self.conv_out = nn.Conv2d(widths[0], out_channels, 3, padding=1)

    def forward(self, z):
        x = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            x = level(x)
        return self.conv_out(F.silu(self.norm_out(x)))


def moments_to_posterior(moments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) of the diagonal Gaussian; the log-variance is clamped to [-30, 20] as the reference does."""
    mean, logvar = moments.chunk(2, dim=1)
    return mean, torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
