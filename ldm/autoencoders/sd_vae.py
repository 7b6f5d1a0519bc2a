"""The KL autoencoder of LDM / Stable Diffusion (SD-1/2, SDXL, SD3, Flux), with published weights from local files.

The architecture is that of diffusers' `AutoencoderKL`: `encode(x, sample=False)` equals its
`encode(x).latent_dist.mean` and `decode(z)` its `decode(z).sample`, unscaled. The published latent
constants are kept as `scale_factor` and `shift_factor`; the diffusion module applies them.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from ldm.autoencoders.sd_vae_blocks import GROUPS, Decoder, Encoder, moments_to_posterior
from ldm.autoencoders.tiling import sliced, tiled
from ldm.contracts.autoencoder import Autoencoder
from ldm.utils.errors import ConfigError
from ldm.weights.vae import load_vae_weights


class SDAutoencoder(Autoencoder):
    """Encoder -> (quant_conv) -> diagonal Gaussian; (post_quant_conv) -> decoder. Downsamples by 2 ** (levels - 1).

    `weights`: a diffusers directory (model or pipeline with `vae/`) or a single file in the diffusers or
    the original layout (see ldm.weights.vae). `tile_size` / `tile_overlap` (image pixels) encode and
    decode large images in blended tiles; `slice_size` runs large batches in slices. None: off.
    `channels_last`: the convolutions run on NHWC feature maps (outputs come back in the default layout);
    None: on the CPU, where oneDNN ran encode + decode 1.2-1.4x faster so (measured in fp32 and bf16), and not
    elsewhere (CUDA's group norm converts NHWC maps back to NCHW).
    """

    def __init__(self, in_channels: int = 3, out_channels: int | None = None, channels: int = 128,
                 channel_mult: list[int] = (1, 2, 4, 4), num_res_blocks: int = 2, latent_channels: int = 4,
                 use_quant_conv: bool = True, downsample: int | None = None, weights: str | None = None,
                 scale_factor: float | None = None, shift_factor: float | None = 0.0, tile_size: int | None = None,
                 tile_overlap: int | None = None, slice_size: int | None = None, channels_last: bool | None = None):
        super().__init__()
        channel_mult = [int(m) for m in channel_mult]
        out_channels = in_channels if out_channels is None else out_channels
        self.downsample = 2 ** (len(channel_mult) - 1)
        if tile_size is not None and tile_overlap is None:
            tile_overlap = tile_size // 4 // self.downsample * self.downsample  # the reference's overlap factor
        _check_arguments(channels, channel_mult, downsample, self.downsample, tile_size, tile_overlap, slice_size)
        self.in_channels, self.out_channels, self.latent_channels = in_channels, out_channels, latent_channels
        self.channels, self.channel_mult, self.num_res_blocks = channels, channel_mult, num_res_blocks
        self.use_quant_conv = use_quant_conv
        self.scale_factor, self.shift_factor = scale_factor, shift_factor
        self.tile_size, self.tile_overlap, self.slice_size = tile_size, tile_overlap, slice_size
        self.channels_last = channels_last
        widths = [channels * m for m in channel_mult]
        self.encoder = Encoder(in_channels, widths, num_res_blocks, latent_channels)
        self.decoder = Decoder(out_channels, widths, num_res_blocks, latent_channels)
        self.quant_conv = nn.Conv2d(2 * latent_channels, 2 * latent_channels, 1) if use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(latent_channels, latent_channels, 1) if use_quant_conv else None
        if weights is not None:
            load_vae_weights(self, weights)

    def architecture(self) -> dict:
        """The arguments that fix the tensors' names and shapes, under their config keys."""
        return dict(in_channels=self.in_channels, out_channels=self.out_channels, channels=self.channels,
                    channel_mult=self.channel_mult, num_res_blocks=self.num_res_blocks,
                    latent_channels=self.latent_channels, use_quant_conv=self.use_quant_conv)

    def moments(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 2 * latent_channels, h, w): the posterior's mean and log-variance, untiled."""
        moments = self.encoder(self.feature_layout(images))
        moments = moments if self.quant_conv is None else self.quant_conv(moments)
        return moments.contiguous()

    def decode_whole(self, latents: torch.Tensor) -> torch.Tensor:
        """The decoder on the whole latent grid at once."""
        latents = self.feature_layout(latents)
        if self.post_quant_conv is not None:
            latents = self.post_quant_conv(latents)
        return self.decoder(latents).contiguous()

    def feature_layout(self, x: torch.Tensor) -> torch.Tensor:
        """`x` in the memory layout the network runs on: NHWC where `channels_last` asks for it (the weights keep
        theirs: oneDNN runs the convolution in its input's layout, and was as fast so)."""
        nhwc = self.channels_last if self.channels_last is not None else x.device.type == "cpu"
        return x.contiguous(memory_format=torch.channels_last) if nhwc else x

    def encode_posterior(self, images):
        encode = self.moments
        if self.tile_size is not None:
            encode = partial(tiled, self.moments, tile=self.tile_size, overlap=self.tile_overlap)
        return moments_to_posterior(sliced(encode, images, self.slice_size))

    def decode(self, latents):
        decode = self.decode_whole
        if self.tile_size is not None:
            decode = partial(tiled, self.decode_whole, tile=self.tile_size // self.downsample,
                             overlap=self.tile_overlap // self.downsample)
        return sliced(decode, latents, self.slice_size)


def _check_arguments(channels, channel_mult, downsample, factor, tile_size, tile_overlap, slice_size) -> None:
    problems = []
    widths = [channels * m for m in channel_mult]
    if not channel_mult or any(width <= 0 or width % GROUPS for width in widths):
        problems.append(f"autoencoder.channels={channels} with channel_mult={channel_mult} gives widths {widths}: "
                        f"each must be a positive multiple of {GROUPS} (the group norm's groups)")
    if downsample is not None and downsample != factor:
        problems.append(f"autoencoder.downsample={downsample}, but channel_mult {channel_mult} downsamples by "
                        f"{factor}: use autoencoder.downsample={factor}")
    if tile_size is not None:
        if tile_size <= 0 or tile_size % factor:
            problems.append(f"autoencoder.tile_size={tile_size} must be a positive multiple of the downsampling "
                            f"factor {factor}")
        elif tile_overlap < 0 or tile_overlap >= tile_size or tile_overlap % factor:
            problems.append(f"autoencoder.tile_overlap={tile_overlap} must be a multiple of {factor} from 0 to "
                            f"less than autoencoder.tile_size={tile_size}")
    if slice_size is not None and slice_size < 1:
        problems.append(f"autoencoder.slice_size={slice_size} must be at least 1 (or null: no slicing)")
    if problems:
        raise ConfigError(problems)
