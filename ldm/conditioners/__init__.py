from ldm.conditioners.conditioner import Conditioner
from ldm.contracts.conditioning import Conditioning

__all__ = ["Conditioner", "Conditioning"]
