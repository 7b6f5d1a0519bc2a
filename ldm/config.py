"""OmegaConf resolvers used by the configs (registered on `import ldm`), and the checks they share."""

from __future__ import annotations

from omegaconf import OmegaConf


def latent_size(image_size: int, downsample: int) -> int:
    """The latent side of `image_size` images under the autoencoder's downsampling factor; it must divide."""
    image_size, downsample = int(image_size), int(downsample)
    if image_size % downsample:
        lower, upper = image_size // downsample * downsample, (image_size // downsample + 1) * downsample
        suggestion = f"{lower} or {upper}" if lower else f"{upper}"
        raise ValueError(f"data.image_size={image_size} is not divisible by the autoencoder's downsampling factor "
                         f"(autoencoder.downsample={downsample}): use a multiple of {downsample}, e.g. {suggestion}")
    return image_size // downsample


def register_resolvers() -> None:
    # `floordiv` is the name saved in run directories' configs, so it stays although it checks more
    if not OmegaConf.has_resolver("floordiv"):
        OmegaConf.register_new_resolver("floordiv", latent_size)
