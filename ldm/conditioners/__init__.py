from ldm.conditioners.conditioner import Conditioner
from ldm.conditioners.conditioning import Conditioning

__all__ = ["Conditioner", "Conditioning"]
