"""DINOv2 features for FD_DINOv2: the ViT of the official `dinov2_vit{s,b,l,g}14_pretrain.pth` files.

The module names follow the official checkpoints, so a file loads with no key map. As FD_DINOv2 does,
images are resized to 224x224 (bicubic), normalized with the ImageNet mean and std, and the feature
is the class token after the final norm. Sizes (width, depth, MLP or SwiGLU) are read from the file.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ldm.metrics.features import FeatureBackend, require_weights, resize, rgb
from ldm.weights.files import WeightsError, load_mapped, read_state_dict

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HEAD_DIM = 64  # every published DINOv2 size has 64-wide heads (384/6, 768/12, 1024/16, 1536/24)
LAYER_NORM_EPS = 1e-6
# the official position-embedding interpolation passes a scale factor of (grid + 0.1) / stored grid
INTERPOLATE_OFFSET = 0.1
SOURCE = "the official DINOv2 backbone weights, e.g. dinov2_vitl14/dinov2_vitl14_pretrain.pth as torch.hub uses"


class LayerScale(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Attention(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.heads = dim // HEAD_DIM
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, head_dim)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class SwiGLU(nn.Module):
    """The feed-forward of ViT-g/14: w12 holds both input projections."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w12, self.w3 = nn.Linear(dim, 2 * hidden), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, value = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(gate) * value)


class Block(nn.Module):
    def __init__(self, dim: int, hidden: int, swiglu: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attn = Attention(dim)
        self.ls1 = LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.mlp = SwiGLU(dim, hidden) if swiglu else Mlp(dim, hidden)
        self.ls2 = LayerScale(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    def __init__(self, dim: int, patch_size: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, rows * cols, dim)


class DinoV2ViT(nn.Module):
    """The DINOv2 backbone; `forward` gives the normed class token (N, dim) of normalized RGB images."""

    def __init__(self, dim: int, depth: int, hidden: int, patch_size: int = 14, grid: int = 37, swiglu: bool = False):
        super().__init__()
        self.patch_size = patch_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, dim))
        self.mask_token = nn.Parameter(torch.zeros(1, dim))  # used only in training; kept so the files load whole
        self.patch_embed = PatchEmbed(dim, patch_size)
        self.blocks = nn.ModuleList(Block(dim, hidden, swiglu) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)

    @classmethod
    def for_state_dict(cls, state: dict[str, torch.Tensor], source: str | Path = "the weights") -> DinoV2ViT:
        """A ViT with the sizes of an official state dict (not yet loaded)."""
        if "register_tokens" in state:
            raise WeightsError(f"{source} is a DINOv2 model with registers (*_reg4_pretrain.pth); FD_DINOv2 uses the "
                               "plain backbone: give dinov2_vit{s,b,l,g}14_pretrain.pth")
        missing = [key for key in ("cls_token", "pos_embed", "patch_embed.proj.weight") if key not in state]
        if missing:
            raise WeightsError(f"{source} is not a DINOv2 backbone state dict: it has no {', '.join(missing)}")
        dim = state["cls_token"].shape[-1]
        depth = len({key.split(".")[1] for key in state if key.startswith("blocks.")})
        swiglu = "blocks.0.mlp.w12.weight" in state
        hidden = state["blocks.0.mlp.w3.weight"].shape[1] if swiglu else state["blocks.0.mlp.fc1.weight"].shape[0]
        grid = math.isqrt(state["pos_embed"].shape[1] - 1)
        return cls(dim, depth, hidden, state["patch_embed.proj.weight"].shape[-1], grid, swiglu)

    def position_embedding(self, rows: int, cols: int) -> torch.Tensor:
        """(1, 1 + rows * cols, dim): the stored grid resampled as the official code does (bicubic, scale factor)."""
        stored = self.pos_embed.shape[1] - 1
        if rows * cols == stored and rows == cols:
            return self.pos_embed
        grid = math.isqrt(stored)
        patches = self.pos_embed[:, 1:].float().reshape(1, grid, grid, -1).permute(0, 3, 1, 2)
        scale = ((rows + INTERPOLATE_OFFSET) / grid, (cols + INTERPOLATE_OFFSET) / grid)
        patches = F.interpolate(patches, scale_factor=scale, mode="bicubic", antialias=False)
        patches = patches.permute(0, 2, 3, 1).reshape(1, rows * cols, -1).to(self.pos_embed.dtype)
        return torch.cat([self.pos_embed[:, :1], patches], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows, cols = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        tokens = torch.cat([self.cls_token.expand(len(x), -1, -1), self.patch_embed(x)], dim=1)
        tokens = tokens + self.position_embedding(rows, cols)
        for block in self.blocks:
            tokens = block(tokens)
        return self.norm(tokens)[:, 0]


class DinoV2Features(FeatureBackend):
    """FD_DINOv2's features: the class token of DINOv2 (ViT-L/14 in the published metric) at 224x224."""

    name = "dinov2"

    def __init__(self, weights: str | Path | None = None, image_size: int = 224):
        path = require_weights(weights, self.name, "dinov2_vitl14_pretrain.pth", SOURCE)
        super().__init__(path, {"image_size": image_size})
        state = read_state_dict(path)
        self.network = DinoV2ViT.for_state_dict(state, path)
        load_mapped(self.network, state, path)
        self.feature_dim = self.network.norm.normalized_shape[0]
        self.image_size = image_size
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.freeze()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = resize(rgb(images), self.image_size, mode="bicubic").clamp(0, 1)
        return self.network((x - self.mean) / self.std)
