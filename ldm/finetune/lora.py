"""`finetune=lora`: peft adapters on the denoiser's layers, the denoiser itself a frozen base.

`adapter`: `lora` (with `use_dora: true`, DoRA), or peft's `loha` / `lokr`; `rank`, `alpha` (the update is
scaled by alpha / rank), `dropout` (LoRA's input dropout; LoHa's and LoKr's rank dropout) and `targets` (presets
or module-name patterns, ldm.finetune.targets). The adapter layers are peft's; checkpoints hold only their
weights (their EMA and optimizer state too), and the base is referenced by path and hash.
"""

from __future__ import annotations

from collections.abc import Sequence

from peft import LoHaConfig, LoKrConfig, LoraConfig, inject_adapter_in_model
from torch import nn

from ldm.finetune.adapters import tuner_layers
from ldm.finetune.targets import LAYERS, matched_modules

ADAPTERS = ("lora", "loha", "lokr")
ADAPTER_NAME = "default"  # a run's own adapter; sample.py adds others under their own names


class LoRA:
    has_base = True

    def __init__(self, rank: int = 4, alpha: float = 4.0, dropout: float = 0.0, targets: Sequence[str] | None = None,
                 use_dora: bool = False, adapter: str = "lora"):
        if adapter not in ADAPTERS:
            raise ValueError(f"finetune.adapter={adapter}: choose one of {', '.join(ADAPTERS)}")
        if use_dora and adapter != "lora":
            raise ValueError(f"finetune.use_dora=true is a LoRA variant: use it with finetune.adapter=lora, "
                             f"not {adapter}")
        self.rank, self.alpha, self.dropout, self.use_dora, self.adapter = rank, alpha, dropout, use_dora, adapter
        self.targets = list(targets) if targets else None

    def layers(self, denoiser: nn.Module) -> list[str]:
        """The names of the layers the adapter wraps."""
        return matched_modules(denoiser, self.targets, leaves=LAYERS)

    def peft_config(self, denoiser: nn.Module):
        names = self.layers(denoiser)
        if self.adapter == "lora":
            return LoraConfig(r=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout, target_modules=names,
                              use_dora=self.use_dora)
        kind = LoHaConfig if self.adapter == "loha" else LoKrConfig
        return kind(r=self.rank, alpha=self.alpha, rank_dropout=self.dropout, target_modules=names)

    def apply(self, denoiser: nn.Module, adapter_name: str = ADAPTER_NAME) -> None:
        """Wrap the targeted layers in place; peft leaves only the adapter's parameters trainable."""
        inject_adapter_in_model(self.peft_config(denoiser), denoiser, adapter_name=adapter_name)
        for layer in tuner_layers(denoiser).values():
            # peft casts a layer's input to the adapter's float32 first (its documented switch turns that off):
            # under autocast the adapter's matmuls take the autocast dtype anyway, so each layer copied its input
            # twice for nothing, ~10% of a bf16 step of the default DiT (measured)
            layer.cast_input_dtype_enabled = False
