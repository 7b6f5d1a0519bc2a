"""A small KL-regularized convolutional VAE (the first stage of latent diffusion)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save
from torch import nn

from ldm.contracts.autoencoder import Autoencoder
from ldm.utils.files import atomic_write

WEIGHTS_DIR = Path(__file__).parent / "weights"


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(32, channels // 4), channels)


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.body = nn.Sequential(_norm(c_in), nn.SiLU(), nn.Conv2d(c_in, c_out, 3, padding=1),
                                  _norm(c_out), nn.SiLU(), nn.Conv2d(c_out, c_out, 3, padding=1))
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x):
        return self.skip(x) + self.body(x)


class Encoder(nn.Module):
    """A strided first convolution halves the resolution at once: the cost stays low at full size."""

    def __init__(self, in_channels: int, channels: int, channel_mult: list[int], latent_channels: int):
        super().__init__()
        widths = [channels * m for m in channel_mult]
        layers: list[nn.Module] = [nn.Conv2d(in_channels, widths[0], 4, stride=2, padding=1)]
        previous = widths[0]
        for level, width in enumerate(widths):
            if level > 0:
                layers.append(nn.Conv2d(previous, width, 3, stride=2, padding=1))
            layers.append(ResBlock(width, width))
            previous = width
        layers += [ResBlock(previous, previous), _norm(previous), nn.SiLU(),
                   nn.Conv2d(previous, 2 * latent_channels, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


class Decoder(nn.Module):
    """Mirror of the encoder; the last upsampling is a sub-pixel convolution (PixelShuffle)."""

    def __init__(self, out_channels: int, channels: int, channel_mult: list[int], latent_channels: int):
        super().__init__()
        widths = [channels * m for m in reversed(channel_mult)]
        layers: list[nn.Module] = [nn.Conv2d(latent_channels, widths[0], 3, padding=1), ResBlock(widths[0], widths[0])]
        previous = widths[0]
        for level, width in enumerate(widths):
            if level > 0:
                layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(previous, width, 3, padding=1)]
            layers.append(ResBlock(width, width))
            previous = width
        layers += [_norm(previous), nn.SiLU(), nn.Conv2d(previous, out_channels * 4, 3, padding=1), nn.PixelShuffle(2)]
        self.net = nn.Sequential(*layers)

    def forward(self, z):
        return self.net(z)


class KLAutoencoder(Autoencoder):
    """Encoder -> diagonal Gaussian posterior -> decoder; downsampling 2 ** len(channel_mult).

    `weights` loads a safetensors file: a path, or the name of a file shipped in
    ldm/autoencoders/weights/ (e.g. `digits_vae`).
    """

    def __init__(self, in_channels: int = 1, latent_channels: int = 4, channels: int = 32,
                 channel_mult: list[int] = (1, 2), downsample: int | None = None, weights: str | None = None):
        super().__init__()
        channel_mult = list(channel_mult)
        self.downsample = 2 ** len(channel_mult)
        if downsample is not None and downsample != self.downsample:
            raise ValueError(f"autoencoder.downsample is {downsample}, but channel_mult {channel_mult} "
                             f"downsamples by {self.downsample}")
        self.in_channels = in_channels
        self.latent_channels = latent_channels
        self.config = dict(in_channels=in_channels, latent_channels=latent_channels, channels=channels,
                           channel_mult=channel_mult)
        self.encoder = Encoder(in_channels, channels, channel_mult, latent_channels)
        self.decoder = Decoder(in_channels, channels, channel_mult, latent_channels)
        if weights is not None:
            self.load_weights(weights)

    def encode_posterior(self, images):
        mean, logvar = self.encoder(images).chunk(2, dim=1)
        return mean, torch.exp(0.5 * logvar.clamp(-30.0, 20.0))

    def decode(self, latents):
        return self.decoder(latents)

    def save_weights(self, path: str | Path) -> None:
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        with atomic_write(path) as handle:
            handle.write(save(state, metadata={"config": json.dumps(self.config)}))

    def load_weights(self, weights: str | Path) -> None:
        path = resolve_weights(weights)
        state = load_file(str(path))
        missing, unexpected = self.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"{path} does not fit this autoencoder config {self.config}: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")


def resolve_weights(weights: str | Path) -> Path:
    path = Path(weights).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        raise IsADirectoryError(f"'{weights}' is a directory, but autoencoder=kl reads one .safetensors file: give "
                                "that file (a diffusers VAE directory is read by autoencoder=sd_vae weights=DIR)")
    shipped = WEIGHTS_DIR / f"{path.stem}.safetensors"
    if path.parent == Path(".") and shipped.is_file():
        return shipped
    available = sorted(p.stem for p in WEIGHTS_DIR.glob("*.safetensors"))
    raise FileNotFoundError(f"autoencoder weights '{weights}' not found: give a path to a .safetensors file or "
                            f"one of the shipped names {available}")
