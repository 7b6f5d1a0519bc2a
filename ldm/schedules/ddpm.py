"""DDPM: VP data row, the network predicts the noise (epsilon)."""

from ldm.schedules.vp import VPSchedule


class DDPM(VPSchedule):
    """target = noise."""

    def model_row(self, t):
        return t.new_zeros(t.shape), t.new_ones(t.shape)
