"""UNet denoiser of ADM (Dhariwal & Nichol, 2021) and latent diffusion (Rombach et al., 2022).

An encoder of residual blocks and downsamplings, a middle block, and a decoder that upsamples and
joins the encoder's features through skip connections. Attention runs where the current
downsampling factor is in `attention_resolutions`: spatial transformers with cross-attention to
text tokens when `context_dim` is set, plain self-attention otherwise. With `use_scale_shift_norm:
false`, `num_heads: 8` (SD-1.x) or `num_head_channels: 64` and `use_linear_projection: true` (SD-2.x)
it has the layout of Stable Diffusion's UNet, and `weights` loads its published weights
(ldm/weights/unet.py).

Every block takes `(x, emb, context, mask)` and ignores what it does not need, so that a stage of
blocks runs (and is checkpointed) uniformly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ldm.contracts.conditioning import Conditioning
from ldm.contracts.denoiser import check_conditioning, consumed_fields
from ldm.models.layers import (
    Attention,
    FeedForward,
    TimestepEmbedder,
    broadcast_time,
    compile_each,
    run_layer,
    vector_embedder,
    zero_init,
)
from ldm.weights.unet import load_unet


def group_norm(channels: int, eps: float = 1e-5) -> nn.GroupNorm:
    if channels % 32:
        raise ValueError(f"model=UNet uses GroupNorm with 32 groups: {channels} channels "
                         f"is not a multiple of 32")
    return nn.GroupNorm(32, channels, eps=eps)


class ResBlock(nn.Module):
    """Two 3x3 convolutions with GroupNorm; the embedding enters as a scale-shift of the second norm
    (ADM, `use_scale_shift_norm`) or as an added bias (SD 1.x). The output conv starts at zero."""

    def __init__(self, in_channels: int, out_channels: int, emb_dim: int, dropout: float = 0.0,
                 use_scale_shift_norm: bool = True):
        super().__init__()
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(group_norm(in_channels), nn.SiLU(),
                                       nn.Conv2d(in_channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_dim, 2 * out_channels if use_scale_shift_norm else out_channels))
        self.out_norm = group_norm(out_channels)
        self.out_layers = nn.Sequential(nn.SiLU(), nn.Dropout(dropout),
                                        zero_init(nn.Conv2d(out_channels, out_channels, 3, padding=1)))
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context=None, mask=None) -> torch.Tensor:
        h = self.in_layers(x)
        emb = self.emb_layers(emb)[:, :, None, None]
        if self.use_scale_shift_norm:
            scale, shift = emb.chunk(2, dim=1)
            h = self.out_norm(h) * (1 + scale) + shift
        else:
            h = self.out_norm(h + emb)
        return self.skip(x) + self.out_layers(h)


class AttentionBlock(nn.Module):
    """Plain spatial self-attention (ADM): GroupNorm, attention over all pixels, zero-init output."""

    def __init__(self, channels: int, num_heads: int):
        super().__init__()
        self.norm = group_norm(channels)
        self.attn = Attention(channels, num_heads, zero_out=True)

    def forward(self, x: torch.Tensor, emb=None, context=None, mask=None) -> torch.Tensor:
        h = rearrange(self.norm(x), "b c h w -> b (h w) c")
        h = rearrange(self.attn(h), "b (h w) c -> b c h w", h=x.shape[-2])
        return x + h


class TransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention to the context tokens, GEGLU feed-forward."""

    def __init__(self, dim: int, num_heads: int, context_dim: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, num_heads, qkv_bias=False)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, num_heads, context_dim=context_dim, qkv_bias=False)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, glu=True, dropout=dropout)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context, mask)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """LDM's transformer on feature maps: GroupNorm, projection in, transformer blocks over pixels,
    zero-initialized projection out, residual. The projections are 1x1 convs, or linear layers on the
    pixel tokens (`linear_projection`, SD-2.x): the same map, stored with another weight shape."""

    def __init__(self, channels: int, num_heads: int, context_dim: int, depth: int = 1, dropout: float = 0.0,
                 linear_projection: bool = False):
        super().__init__()
        self.linear_projection = linear_projection
        self.norm = group_norm(channels, eps=1e-6)
        project = nn.Linear if linear_projection else (lambda cin, cout: nn.Conv2d(cin, cout, 1))
        self.proj_in = project(channels, channels)
        self.blocks = nn.ModuleList(
            TransformerBlock(channels, num_heads, context_dim, dropout) for _ in range(depth))
        self.proj_out = zero_init(project(channels, channels))

    def forward(self, x: torch.Tensor, emb=None, context=None, mask=None) -> torch.Tensor:
        to_tokens, to_map = "b c h w -> b (h w) c", "b (h w) c -> b c h w"
        if self.linear_projection:
            h = self.proj_in(rearrange(self.norm(x), to_tokens))
        else:
            # token-major memory: elementwise ops keep their input's layout, so a channels-first view would make
            # every layer norm and linear layer of the blocks copy it
            h = rearrange(self.proj_in(self.norm(x)), to_tokens).contiguous()
        for block in self.blocks:
            h = block(h, context, mask)
        if self.linear_projection:
            return x + rearrange(self.proj_out(h), to_map, h=x.shape[-2])
        return x + self.proj_out(rearrange(h, to_map, h=x.shape[-2]))


class Downsample(nn.Module):
    """Strided 3x3 convolution, halving the resolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor, emb=None, context=None, mask=None) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour doubling, then a 3x3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, emb=None, context=None, mask=None) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UNet(nn.Module):
    """ADM / LDM UNet; `forward(x, t, cond)` returns a tensor of x's shape.

    `channel_mult` sets the width of each resolution level; `attention_resolutions` lists the
    downsampling factors (1, 2, 4, ...) that get attention. Heads: `num_head_channels` (> 0) fixes
    the width of a head, else `num_heads` fixes their number. `time_scale` multiplies t before the
    sinusoids (1 for networks trained on the integer DDPM level). `weights` loads a diffusers UNet
    directory or an original Stable Diffusion checkpoint. `channels_last` keeps feature maps (and conv
    weights) in NHWC memory, where pixel tokens are views; `compile` torch.compiles each layer in place.
    """

    def __init__(self, in_channels: int = 4, out_channels: int | None = None, channels: int = 128,
                 channel_mult: list[int] = (1, 2, 4), num_res_blocks: int = 2,
                 attention_resolutions: list[int] = (2, 4), num_heads: int = 4, num_head_channels: int = -1,
                 vector_dim: int | None = None, context_dim: int | None = None, concat_channels: int = 0,
                 input_size: int | list[int] | None = None, time_scale: float = 1000.0,
                 gradient_checkpointing: bool = False, transformer_depth: int = 1, dropout: float = 0.0,
                 use_scale_shift_norm: bool = True, use_linear_projection: bool = False,
                 weights: str | None = None, channels_last: bool = False,
                 compile: bool = False):  # noqa: A002 - the config key
        super().__init__()
        self.factor = 2 ** (len(channel_mult) - 1)
        if input_size is not None:
            self._check_size(*((input_size, input_size) if isinstance(input_size, int) else input_size))
        self.out_channels = out_channels or in_channels
        self.concat_channels = concat_channels
        self.gradient_checkpointing = gradient_checkpointing
        self.channels_last = channels_last
        self.compile_layers = compile  # done at the first forward, which knows the device
        self.consumes = consumed_fields(vector_dim, context_dim, concat_channels)
        attention_resolutions = set(attention_resolutions)
        # the architecture, as the weight readers and writers of ldm/weights/unet.py need it
        self.settings = dict(
            in_channels=in_channels, out_channels=self.out_channels, channels=channels,
            channel_mult=list(channel_mult), num_res_blocks=num_res_blocks,
            attention_resolutions=sorted(attention_resolutions), num_heads=num_heads,
            num_head_channels=num_head_channels, vector_dim=vector_dim, context_dim=context_dim,
            concat_channels=concat_channels, transformer_depth=transformer_depth,
            use_scale_shift_norm=use_scale_shift_norm, use_linear_projection=use_linear_projection,
            time_scale=time_scale, input_size=input_size if input_size is None or isinstance(input_size, int)
            else list(input_size))

        def attention(width: int) -> nn.Module:
            if context_dim:
                return SpatialTransformer(width, self.heads(width), context_dim, transformer_depth, dropout,
                                          use_linear_projection)
            return AttentionBlock(width, self.heads(width))

        def res_block(cin: int, cout: int) -> ResBlock:
            return ResBlock(cin, cout, emb_dim, dropout, use_scale_shift_norm)

        emb_dim = 4 * channels
        self.time_embed = TimestepEmbedder(emb_dim, channels, time_scale)
        self.vector_embed = vector_embedder(vector_dim, emb_dim) if vector_dim else None
        self.conv_in = nn.Conv2d(in_channels + concat_channels, channels, 3, padding=1)

        # encoder: each stage's output is kept for a skip connection
        self.down_stages = nn.ModuleList()
        skip_widths, width, factor = [channels], channels, 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                stage = [res_block(width, channels * mult)]
                width = channels * mult
                if factor in attention_resolutions:
                    stage.append(attention(width))
                self.down_stages.append(nn.ModuleList(stage))
                skip_widths.append(width)
            if level < len(channel_mult) - 1:
                self.down_stages.append(nn.ModuleList([Downsample(width)]))
                skip_widths.append(width)
                factor *= 2

        self.middle = nn.ModuleList([res_block(width, width), attention(width), res_block(width, width)])

        # decoder: one more block per level than the encoder, to take the downsampling's skip too
        self.up_stages = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for index in range(num_res_blocks + 1):
                stage = [res_block(width + skip_widths.pop(), channels * mult)]
                width = channels * mult
                if factor in attention_resolutions:
                    stage.append(attention(width))
                if level > 0 and index == num_res_blocks:
                    stage.append(Upsample(width))
                    factor //= 2
                self.up_stages.append(nn.ModuleList(stage))

        self.out = nn.Sequential(group_norm(width), nn.SiLU(),
                                 zero_init(nn.Conv2d(width, self.out_channels, 3, padding=1)))
        if weights is not None:
            load_unet(self, weights)
        if channels_last:  # loading copies into these tensors, so weights loaded later keep the layout
            self.to(memory_format=torch.channels_last)

    def heads(self, width: int) -> int:
        """The number of attention heads of a block `width` channels wide."""
        num_heads, head_channels = self.settings["num_heads"], self.settings["num_head_channels"]
        count = width // head_channels if head_channels > 0 else num_heads
        if not count or width % count or (head_channels > 0 and width % head_channels):
            raise ValueError(f"model=UNet: {width} channels do not split into heads "
                             f"(num_heads={num_heads}, num_head_channels={head_channels})")
        return count

    def _check_size(self, height: int, width: int) -> None:
        if height % self.factor or width % self.factor:
            raise ValueError(f"model=UNet with {self.factor.bit_length()} levels halves the latents "
                             f"{self.factor.bit_length() - 1} times: {height}x{width} is not divisible "
                             f"by {self.factor}")

    def stages(self) -> list[nn.ModuleList]:
        """The encoder's stages, the middle block and the decoder's stages, in the order they run."""
        return [*self.down_stages, self.middle, *self.up_stages]

    def _run(self, stage: nn.ModuleList, h: torch.Tensor, emb: torch.Tensor, cond: Conditioning):
        for layer in stage:
            h = run_layer(layer, h, emb, cond.tokens, cond.token_mask,
                          checkpointing=self.gradient_checkpointing)
        return h

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning | None = None) -> torch.Tensor:
        cond = Conditioning() if cond is None else cond
        check_conditioning(self, cond.present())
        self._check_size(*x.shape[-2:])
        emb = self.time_embed(broadcast_time(t, x.shape[0], x.device))  # (B, 4 * channels)
        if self.vector_embed is not None:
            emb = emb + self.vector_embed(cond.vector)
        if self.concat_channels:
            x = torch.cat([x, cond.concat.to(x.dtype)], dim=1)
        if self.compile_layers:
            compile_each([layer for stage in self.stages() for layer in stage], x.device)
            self.compile_layers = False

        h = self.conv_in(x.contiguous(memory_format=torch.channels_last) if self.channels_last else x)
        skips = [h]
        for stage in self.down_stages:
            h = self._run(stage, h, emb, cond)
            skips.append(h)
        h = self._run(self.middle, h, emb, cond)
        for stage in self.up_stages:
            h = self._run(stage, torch.cat([h, skips.pop()], dim=1), emb, cond)
        return self.out(h).contiguous()
