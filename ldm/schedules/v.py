"""v-prediction (Salimans & Ho 2022): VP data row, target = alpha * noise - sigma * x0."""

from ldm.schedules.vp import VPSchedule


class VPrediction(VPSchedule):
    """target = -sigma * x0 + alpha * noise."""

    def model_row(self, t):
        alpha, sigma = self.alpha_sigma(t)
        return -sigma, alpha
