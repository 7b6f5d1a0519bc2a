"""Parameterizations: each diffusion method as a data row and a model row (config group `schedule`)."""

from ldm.schedules.base import Parameterization, expand_as
from ldm.schedules.beta_schedules import alphas_cumprod, make_betas, rescale_zero_terminal_snr
from ldm.schedules.ddpm import DDPM
from ldm.schedules.edm import EDM
from ldm.schedules.flow import RectifiedFlow, shift_time
from ldm.schedules.trig import TrigFlow
from ldm.schedules.v import VPrediction
from ldm.schedules.vp import VPSchedule
from ldm.schedules.x0 import X0Prediction

__all__ = [
    "DDPM",
    "EDM",
    "Parameterization",
    "RectifiedFlow",
    "TrigFlow",
    "VPSchedule",
    "VPrediction",
    "X0Prediction",
    "alphas_cumprod",
    "expand_as",
    "make_betas",
    "rescale_zero_terminal_snr",
    "shift_time",
]
