"""The adapters peft put into a denoiser: which tensors are theirs, several of them at once, merging them away.

Parameter names of a wrapped layer: its own weights under `LAYER.base_layer.*` (the base), the adapter's under
`LAYER.lora_A.NAME.*`, `LAYER.lora_B.NAME.*`, ... (peft's). `base_name` gives the base tensors the names the
unwrapped network has, so that a base is recognised whether or not adapters sit on it.
"""

from __future__ import annotations

import torch
from peft.functional import set_adapter
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ldm.utils.fingerprint import tensors_fingerprint

BASE_LAYER = "base_layer"


def tuner_layers(model: nn.Module) -> dict[str, BaseTunerLayer]:
    """Every layer that peft wrapped, by its name in `model`."""
    return {name: module for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)}


def adapter_keys(model: nn.Module) -> set[str]:
    """The state-dict keys of `model` that belong to adapters (everything of a wrapped layer but its base layer)."""
    keys = set()
    for name, layer in tuner_layers(model).items():
        keys |= {f"{name}.{key}" for key in layer.state_dict() if not key.startswith(f"{BASE_LAYER}.")}
    return keys


def base_name(key: str) -> str:
    """A key of a wrapped network as the unwrapped network names it (`x.base_layer.weight` -> `x.weight`)."""
    return ".".join(part for part in key.split(".") if part != BASE_LAYER)


def adapter_names(model: nn.Module) -> list[str]:
    """The adapters present in `model` (on any layer), in the order they were added."""
    names: dict[str, None] = {}
    for layer in tuner_layers(model).values():
        for attribute in layer.adapter_layer_names:
            names.update(dict.fromkeys(getattr(layer, attribute).keys()))
    return list(names)


def activate(model: nn.Module, scales: dict[str, float]) -> None:
    """Make these adapters act together, each with its weight (diffusers' `set_adapters` with weights does the same
    through the same peft calls): the output is the base's plus the sum of weight * each adapter's update."""
    set_adapter(model, list(scales), inference_mode=not model.training)
    for layer in tuner_layers(model).values():
        for name, scale in scales.items():
            layer.set_scale(name, scale)


def merge_adapters(model: nn.Module) -> nn.Module:
    """Fold the active adapters into the base weights (peft's merge) and put the plain layers back in place."""
    for name, layer in tuner_layers(model).items():
        layer.merge(safe_merge=True)
        parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
        setattr(parent, name.rpartition(".")[2], layer.get_base_layer())
    return model


def base_fingerprint(network: nn.Module) -> str:
    """The hash of a network's own weights, adapters left out, under the unwrapped network's names."""
    adapters = adapter_keys(network)
    return tensors_fingerprint({base_name(key): value for key, value in network.state_dict().items()
                                if key not in adapters})


def renamed_adapter(weights: dict[str, torch.Tensor], old: str, new: str) -> dict[str, torch.Tensor]:
    """An adapter's tensors (state-dict names, `...lora_A.OLD.weight`) under another adapter name."""
    return {".".join(new if part == old else part for part in key.split(".")): value
            for key, value in weights.items() if old in key.split(".")}
