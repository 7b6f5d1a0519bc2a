"""Samplers (config group `sampler`): generic over the parameterization contract (guidance: ldm.guidance)."""

from ldm.samplers.ancestral import Ancestral
from ldm.samplers.base import Sampler
from ldm.samplers.dpmpp_2m import DPMSolverPP2M
from ldm.samplers.euler import Euler
from ldm.samplers.euler_ancestral import EulerAncestral
from ldm.samplers.heun import Heun

# The name `_target_: ldm.samplers.DDPMSampler` in run directories saved before the rename.
DDPMSampler = Ancestral

__all__ = [
    "Ancestral",
    "DPMSolverPP2M",
    "Euler",
    "EulerAncestral",
    "Heun",
    "Sampler",
]
