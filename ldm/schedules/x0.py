"""x0-prediction: VP data row, the network predicts the clean data."""

from ldm.schedules.vp import VPSchedule


class X0Prediction(VPSchedule):
    """target = x0."""

    def model_row(self, t):
        return t.new_ones(t.shape), t.new_zeros(t.shape)
