"""Encoding and decoding in pieces: batch slices (same result) and overlapping spatial tiles (blended).

Tiles are `tile` wide and `tile - overlap` apart, the last one flush with the edge so every tile has the
full size. Where two tiles overlap over L positions, the earlier fades out and the later fades in
linearly (weights 1 - y / L and y / L), as in diffusers' `enable_tiling()`; where four meet, the weights
are the products of the row and column ramps. (diffusers instead adds shorter tiles past the last full
one, and blends corners in sequence, so only those places differ.)
"""

from __future__ import annotations

from collections.abc import Callable
from fractions import Fraction

import torch

from ldm.utils.errors import UserError

TensorFn = Callable[[torch.Tensor], torch.Tensor]


def sliced(fn: TensorFn, x: torch.Tensor, slice_size: int | None) -> torch.Tensor:
    """`fn` over batches of at most `slice_size` samples, concatenated (None: the whole batch at once)."""
    if slice_size is None or x.shape[0] <= slice_size:
        return fn(x)
    return torch.cat([fn(part) for part in x.split(slice_size)])


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Starts of tiles of size `tile` covering [0, length), `tile - overlap` apart, the last flush with the end."""
    if length <= tile:
        return [0]
    return list(range(0, length - tile, tile - overlap)) + [length - tile]


def blend_weights(starts: list[int], tile: int) -> list[torch.Tensor]:
    """Per tile, its 1-D weights: a linear ramp up over the overlap with the previous tile, down over the next."""
    weights = []
    for index, start in enumerate(starts):
        weight = torch.ones(tile)
        if index > 0:
            shared = starts[index - 1] + tile - start
            weight[:shared] *= torch.arange(shared) / shared
        if index < len(starts) - 1:
            shared = start + tile - starts[index + 1]
            weight[tile - shared:] *= 1 - torch.arange(shared) / shared
        weights.append(weight)
    return weights


def tiled(fn: TensorFn, x: torch.Tensor, tile: int, overlap: int) -> torch.Tensor:
    """`fn` (a map between (B, C, H, W) grids that scales H and W by one factor) applied tile by tile.

    An input that fits in one tile is passed whole, so its result is exactly `fn(x)`."""
    height, width = x.shape[-2:]
    if height <= tile and width <= tile:
        return fn(x)
    tile_h, tile_w = min(tile, height), min(tile, width)
    rows, columns = tile_starts(height, tile_h, overlap), tile_starts(width, tile_w, overlap)
    first = fn(x[..., :tile_h, :tile_w])
    scale = Fraction(first.shape[-1], tile_w)  # 1/8 for an encoder, 8 for a decoder
    out_rows, out_columns = [_scaled(s, scale) for s in rows], [_scaled(s, scale) for s in columns]
    out_h, out_w = first.shape[-2:]
    # ramps on the output grid: a decoder's tiles blend over overlap * 8 pixels
    row_weights, column_weights = blend_weights(out_rows, out_h), blend_weights(out_columns, out_w)
    total = first.new_zeros((*first.shape[:-2], _scaled(height, scale), _scaled(width, scale)), dtype=torch.float32)
    weight_sum = torch.zeros(total.shape[-2:], device=first.device)
    for top, out_top, row_weight in zip(rows, out_rows, row_weights, strict=True):
        for left, out_left, column_weight in zip(columns, out_columns, column_weights, strict=True):
            piece = first if top == left == 0 else fn(x[..., top:top + tile_h, left:left + tile_w])
            weight = torch.outer(row_weight, column_weight).to(first.device)
            total[..., out_top:out_top + out_h, out_left:out_left + out_w] += piece.float() * weight
            weight_sum[out_top:out_top + out_h, out_left:out_left + out_w] += weight
    return (total / weight_sum).to(first.dtype)


def _scaled(position: int, scale: Fraction) -> int:
    scaled = position * scale
    if scaled.denominator != 1:
        raise UserError(f"a tile edge at {position} falls between latent positions (factor {scale}): use image "
                        f"sizes, autoencoder.tile_size and autoencoder.tile_overlap that are multiples of "
                        f"{scale.denominator}")
    return int(scaled)
