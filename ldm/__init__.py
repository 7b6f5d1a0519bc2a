"""ldm: latent diffusion with Lightning and Hydra."""

from ldm.config import register_resolvers

register_resolvers()
