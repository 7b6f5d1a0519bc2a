"""Fine-tuning a denoiser (config group `finetune`): every weight (`full`), peft adapters on a frozen base
(`lora`), or the targeted modules only (`partial`)."""

from ldm.finetune.full import Full
from ldm.finetune.lora import LoRA
from ldm.finetune.partial import Partial

__all__ = ["Full", "LoRA", "Partial"]
