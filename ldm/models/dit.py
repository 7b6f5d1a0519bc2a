"""DiT: the diffusion transformer with adaLN-Zero blocks (Peebles & Xie, 2023).

Latents are cut into patches, embedded as tokens with a fixed 2-D sin-cos position embedding, and
run through transformer blocks whose layer norms are modulated by the embedding of t (plus the
conditioning vector). Optional cross-attention to text tokens sits between self-attention and MLP.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

from ldm.contracts.conditioning import Conditioning
from ldm.contracts.denoiser import check_conditioning, consumed_fields
from ldm.models.layers import (
    AdaLNModulation,
    Attention,
    FeedForward,
    TimestepEmbedder,
    broadcast_time,
    compile_each,
    in_autocast_dtype,
    modulate,
    run_layer,
    timestep_embedding,
    vector_embedder,
    zero_init,
)
from ldm.weights.dit import load_dit

POS_EMBED_LAYOUTS = ("row_cos_sin", "col_sin_cos")


def sincos_position_embedding(dim: int, grid_h: int, grid_w: int, layout: str = "row_cos_sin") -> torch.Tensor:
    """Fixed (grid_h * grid_w, dim) embedding: half the channels encode the row, half the column.

    `row_cos_sin`: [cos, sin] of the row, then of the column; `col_sin_cos` (the published DiT's and
    diffusers'): [sin, cos] of the column, then of the row.
    """
    if dim % 4:
        raise ValueError(f"the 2-D sin-cos position embedding needs hidden_size divisible by 4, got {dim}")
    if layout not in POS_EMBED_LAYOUTS:
        raise ValueError(f"model.pos_embed_layout must be one of {', '.join(POS_EMBED_LAYOUTS)}, got {layout!r}")
    rows, cols = torch.meshgrid(torch.arange(grid_h, dtype=torch.float32),
                                torch.arange(grid_w, dtype=torch.float32), indexing="ij")
    # positions are token indices, so the embedding's own frequencies apply (max period 10000)
    if layout == "row_cos_sin":
        return torch.cat([timestep_embedding(rows.flatten(), dim // 2),
                          timestep_embedding(cols.flatten(), dim // 2)], dim=-1)
    # rolling by a quarter of the width swaps the [cos | sin] halves of each part into [sin | cos]
    return torch.cat([timestep_embedding(cols.flatten(), dim // 2).roll(dim // 4, dims=-1),
                      timestep_embedding(rows.flatten(), dim // 2).roll(dim // 4, dims=-1)], dim=-1)


class DiTBlock(nn.Module):
    """adaLN-Zero block: the t/vector embedding regresses shift, scale and gate of each sublayer."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, context_dim: int | None):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.cross_attn = None
        if context_dim:
            # text is not modulated by t; a zero output projection keeps the block's identity start
            self.norm_cross = nn.LayerNorm(hidden_size, eps=1e-6)
            self.cross_attn = Attention(hidden_size, num_heads, context_dim=context_dim, zero_out=True)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = FeedForward(hidden_size, mlp_ratio)
        self.adaLN_modulation = AdaLNModulation(hidden_size, hidden_size, 6)

    def forward(self, x: torch.Tensor, c: torch.Tensor, context: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        shift_attn, scale_attn, gate_attn, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c)
        x = torch.addcmul(x, gate_attn, self.attn(modulate(self.norm1(x), shift_attn, scale_attn)))
        if self.cross_attn is not None:
            x = x + self.cross_attn(self.norm_cross(x), context, mask)
        return torch.addcmul(x, gate_mlp, self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp)))


class FinalLayer(nn.Module):
    """Modulated layer norm, then a zero-initialized projection of each token to its patch."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.adaLN_modulation = AdaLNModulation(hidden_size, hidden_size, 2)
        self.linear = zero_init(nn.Linear(hidden_size, patch_size * patch_size * out_channels))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c)
        return self.linear(modulate(self.norm(x), shift, scale))


class DiT(nn.Module):
    """Diffusion transformer; `forward(x, t, cond)` returns a tensor of x's shape (zero at init).

    `input_size` is the latent size, an int or [h, w]. Conditioning: `vector_dim` adds a vector to
    the t embedding (a class embedding of width hidden_size is added as it is), `context_dim` adds
    cross-attention to tokens, `concat_channels` joins an image to the input.

    Time: the network embeds `t * time_scale`. With schedule.time_input=unit (t in [0, 1]) the default
    1000 gives k + 1 at level k; pretrained DDPM-family weights want the level k itself:
    schedule.time_input=level with time_scale=1. `time_frequency_shift` picks the sinusoid
    frequencies: 0 is the published DiT code's, 1 diffusers' DiTTransformer2DModel's.

    `learn_sigma`: the network has twice the output channels, as the published DiT checkpoints
    (epsilon, then the variance interpolation); `forward` returns the epsilon half and drops the
    variance half, which the first-order samplers here do not use. `weights`: a DiT checkpoint (the
    published `.pt` or a diffusers directory, see ldm.weights.dit), loaded after initialization.
    `compile`: torch.compile each block (in place, so parameter names do not change).
    """

    def __init__(self, input_size: int | list[int] = 32, patch_size: int = 2, in_channels: int = 4,
                 hidden_size: int = 1152, depth: int = 28, num_heads: int = 16, mlp_ratio: float = 4.0,
                 out_channels: int | None = None, vector_dim: int | None = None,
                 context_dim: int | None = None, concat_channels: int = 0, time_scale: float = 1000.0,
                 gradient_checkpointing: bool = False, learn_sigma: bool = False,
                 pos_embed_layout: str = "row_cos_sin", time_frequency_shift: float = 0.0,
                 weights: str | None = None, compile: bool = False):  # noqa: A002 - the config key
        super().__init__()
        height, width = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
        if height % patch_size or width % patch_size:
            raise ValueError(f"model=DiT needs input_size divisible by patch_size: {height}x{width} latents "
                             f"do not split into {patch_size}x{patch_size} patches")
        if hidden_size % num_heads:
            raise ValueError(f"model=DiT needs hidden_size divisible by num_heads: "
                             f"{hidden_size} is not divisible by {num_heads}")
        self.input_size = (height, width)
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.out_channels = out_channels or in_channels
        self.learn_sigma = learn_sigma
        self.pos_embed_layout = pos_embed_layout
        self.concat_channels = concat_channels
        self.gradient_checkpointing = gradient_checkpointing
        self.compile_blocks = compile  # done at the first forward, which knows the device
        self.consumes = consumed_fields(vector_dim, context_dim, concat_channels)

        self.patch_embed = nn.Conv2d(in_channels + concat_channels, hidden_size, patch_size,
                                     stride=patch_size)
        self.register_buffer("pos_embed", sincos_position_embedding(
            hidden_size, height // patch_size, width // patch_size, pos_embed_layout)[None], persistent=False)
        self.t_embedder = TimestepEmbedder(hidden_size, 256, time_scale, time_frequency_shift)
        self.vector_embedder = vector_embedder(vector_dim, hidden_size) if vector_dim else None
        self.blocks = nn.ModuleList(
            DiTBlock(hidden_size, num_heads, mlp_ratio, context_dim) for _ in range(depth))
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels * (2 if learn_sigma else 1))
        self.initialize_weights()
        if weights:
            load_dit(self, weights)

    def initialize_weights(self) -> None:
        """Xavier-uniform linear layers (the patch embedding too), N(0, 0.02) for the t MLP, and the
        zero-initialized adaLN-Zero modulations, cross-attention outputs and final layer."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.xavier_uniform_(self.patch_embed.weight.view(self.patch_embed.weight.shape[0], -1))
        nn.init.zeros_(self.patch_embed.bias)
        for linear in (self.t_embedder.mlp[0], self.t_embedder.mlp[2]):
            nn.init.normal_(linear.weight, std=0.02)
        for block in self.blocks:
            zero_init(block.adaLN_modulation)
            if block.cross_attn is not None:
                zero_init(block.cross_attn.to_out)
        zero_init(self.final_layer.adaLN_modulation)
        zero_init(self.final_layer.linear)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning | None = None) -> torch.Tensor:
        cond = Conditioning() if cond is None else cond
        check_conditioning(self, cond.present())
        if tuple(x.shape[-2:]) != self.input_size:
            raise ValueError(f"model=DiT was built for {self.input_size[0]}x{self.input_size[1]} latents "
                             f"(model.input_size), got {x.shape[-2]}x{x.shape[-1]}")
        if self.concat_channels:
            x = torch.cat([x, cond.concat.to(x.dtype)], dim=1)
        # the residual stream in autocast's dtype, as the blocks' outputs (see in_autocast_dtype), and
        # token-major in memory: the convolution writes channels first, and elementwise ops keep their
        # input's layout, so without the copy every layer norm and linear layer of every block made one
        tokens = rearrange(self.patch_embed(x), "b d h w -> b (h w) d").contiguous()
        tokens = in_autocast_dtype(tokens + self.pos_embed)

        if self.compile_blocks:
            compile_each(self.blocks, x.device)
            self.compile_blocks = False
        c = self.t_embedder(broadcast_time(t, x.shape[0], x.device))  # (B, hidden)
        if self.vector_embedder is not None:
            c = c + self.vector_embedder(cond.vector)
        for block in self.blocks:
            tokens = run_layer(block, tokens, c, cond.tokens, cond.token_mask,
                               checkpointing=self.gradient_checkpointing)
        patches = self.final_layer(tokens, c)
        patch = self.patch_size
        out = rearrange(patches, "b (h w) (ph pw c) -> b c (h ph) (w pw)",
                        h=self.input_size[0] // patch, ph=patch, pw=patch)
        return out[:, : self.out_channels] if self.learn_sigma else out
