"""OmegaConf resolvers used by the configs (registered on `import ldm`)."""

from __future__ import annotations

from omegaconf import OmegaConf


def _floordiv(size: int, factor: int) -> int:
    size, factor = int(size), int(factor)
    if size % factor:
        raise ValueError(f"image size {size} is not divisible by the autoencoder's downsampling factor {factor}")
    return size // factor


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("floordiv"):
        OmegaConf.register_new_resolver("floordiv", _floordiv)
