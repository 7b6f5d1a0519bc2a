"""TrigFlow / GVP velocity: a whole method in its two rows."""

import math

import torch

from ldm.schedules.base import Parameterization


class TrigFlow(Parameterization):
    """x_t = cos(pi t / 2) x0 + sin(pi t / 2) noise; target = d x_t / dt."""

    def alpha_sigma(self, t):
        # cos(pi t / 2) written as sin(pi (1 - t) / 2): exactly 0 at t = 1 in float32 too, where
        # cos(float32(pi / 2)) is -4e-8 and a negative alpha breaks log-SNR samplers
        return torch.sin(math.pi / 2 * (1 - t)), torch.sin(math.pi / 2 * t)

    def model_row(self, t):
        alpha, sigma = self.alpha_sigma(t)
        return -math.pi / 2 * sigma, math.pi / 2 * alpha
