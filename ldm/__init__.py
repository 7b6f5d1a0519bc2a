"""ldm: latent diffusion with Lightning and Hydra."""

# both light (standard library and omegaconf only): entry points import ldm before Hydra parses
# the arguments, and `--help` must not wait for torch
from ldm.utils.config import register_resolvers
from ldm.utils.quiet import silence_known_warnings

register_resolvers()
silence_known_warnings()
