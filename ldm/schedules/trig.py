"""TrigFlow / GVP velocity: a whole method in its two rows."""

import math

import torch

from ldm.schedules.base import Parameterization


class TrigFlow(Parameterization):
    """x_t = cos(pi t / 2) x0 + sin(pi t / 2) noise; target = d x_t / dt."""

    def alpha_sigma(self, t):
        return torch.cos(math.pi / 2 * t), torch.sin(math.pi / 2 * t)

    def model_row(self, t):
        alpha, sigma = self.alpha_sigma(t)
        return -math.pi / 2 * sigma, math.pi / 2 * alpha
