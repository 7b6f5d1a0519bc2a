"""Parameterizations: each diffusion method as a data row and a model row (config group `schedule`),
and the parts any of them takes: time samplers and loss weights."""

from ldm.schedules.base import Parameterization, expand_as
from ldm.schedules.beta_schedules import alphas_cumprod, make_betas, rescale_zero_terminal_snr
from ldm.schedules.ddpm import DDPM
from ldm.schedules.edm import EDM
from ldm.schedules.flow import RectifiedFlow, shift_time
from ldm.schedules.loss_weights import LOSS_WEIGHTS, EDMWeight, MinSNRWeight, NoWeight, SD3Weight
from ldm.schedules.time_samplers import TIME_SAMPLERS, Discrete, LogitNormal, LogNormal, Mode, Uniform
from ldm.schedules.trig import TrigFlow
from ldm.schedules.v import VPrediction
from ldm.schedules.vp import VPSchedule
from ldm.schedules.x0 import X0Prediction

__all__ = [
    "DDPM",
    "EDM",
    "LOSS_WEIGHTS",
    "TIME_SAMPLERS",
    "Discrete",
    "EDMWeight",
    "LogNormal",
    "LogitNormal",
    "MinSNRWeight",
    "Mode",
    "NoWeight",
    "Parameterization",
    "RectifiedFlow",
    "SD3Weight",
    "TrigFlow",
    "Uniform",
    "VPSchedule",
    "VPrediction",
    "X0Prediction",
    "alphas_cumprod",
    "expand_as",
    "make_betas",
    "rescale_zero_terminal_snr",
    "shift_time",
]
