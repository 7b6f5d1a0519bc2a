"""Former home of the shapes metric, now ldm.evaluation.shapes; kept so that existing imports still work."""

from ldm.evaluation.shapes import evaluate, foreground_mask, judge  # noqa: F401
from ldm.images import to_uint8  # noqa: F401
