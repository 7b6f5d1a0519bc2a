"""Denoisers: `DiT` and `UNet`, both called as `denoiser(x, t, cond)`."""

from ldm.contracts.denoiser import check_conditioning
from ldm.models.dit import DiT
from ldm.models.unet import UNet

__all__ = ["DiT", "UNet", "check_conditioning"]
