"""LoRA files for the project's denoisers: a run's adapter written as diffusers' file, and files of diffusers', peft's
or kohya's format read in as a peft adapter.

Where the project fuses attention projections (self-attention's to_qkv is [q | k | v] by rows, cross-attention's
to_kv is [k | v]), diffusers keeps them apart. Both ways are exact: a fused layer's update B A splits by rows into
updates B_q A, B_k A, B_v A of the same rank; separate updates stack into one of their summed rank, the down
projections stacked and the up projections placed block-diagonally. Each module's scale goes into its up projection.
"""

from __future__ import annotations

import re

import torch
from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
from torch import nn

from ldm.finetune.adapters import tuner_layers
from ldm.finetune.lora import ADAPTER_NAME
from ldm.weights import dit, unet
from ldm.weights.files import WeightsError
from ldm.weights.lora import KOHYA, KOHYA_PREFIX, LoraFile, LowRank, read_lora, write_diffusers

PREFIXES = {"UNet": "unet", "DiT": "transformer"}  # the network's prefix in a diffusers LoRA file


def layer_maps(denoiser: nn.Module) -> list[dict[str, list[str]]]:
    """Project layer name -> its module paths in the file's network, per layout a file may use."""
    kind = type(denoiser).__name__
    if kind == "UNet":
        return [unet.layer_map(denoiser, unet.DIFFUSERS), unet.layer_map(denoiser, unet.ORIGINAL)]
    if kind == "DiT":
        return [dit.layer_map(denoiser)]
    raise WeightsError(f"LoRA files: model {kind} has no diffusers layout (model=unet_sd and the DiT have)")


def export_updates(denoiser: nn.Module, adapter: str = ADAPTER_NAME) -> dict[str, LowRank]:
    """The adapter of every wrapped layer, per diffusers module path (a fused layer split by rows)."""
    mapping = layer_maps(denoiser)[0]
    updates = {}
    for name, layer in tuner_layers(denoiser).items():
        if adapter not in getattr(layer, "lora_A", {}):
            raise WeightsError(f"{name} holds a {type(layer).__module__.split('.')[-2]} adapter: diffusers LoRA files "
                               "hold LoRA and DoRA adapters only (finetune.adapter=lora)")
        if name not in mapping:
            raise WeightsError(f"{name} has no single module in diffusers' {PREFIXES[type(denoiser).__name__]}: "
                               "leave it out of finetune.targets to export the adapters")
        down, up = layer.lora_A[adapter].weight.detach(), layer.lora_B[adapter].weight.detach()
        magnitude = layer.lora_magnitude_vector[adapter].weight.detach() if layer.use_dora.get(adapter) else None
        parts = mapping[name]
        ups = up.chunk(len(parts))
        magnitudes = magnitude.chunk(len(parts), dim=-1 if magnitude.ndim == 1 else 1) if magnitude is not None \
            else [None] * len(parts)
        for path, part_up, part_magnitude in zip(parts, ups, magnitudes, strict=True):
            updates[path] = LowRank(down, part_up, float(layer.scaling[adapter]), part_magnitude)
    if not updates:
        raise WeightsError("the denoiser has no adapters to export (a finetune=lora run has)")
    return updates


def export_lora(denoiser: nn.Module, directory, adapter: str = ADAPTER_NAME):
    """Write `directory/pytorch_lora_weights.safetensors`, which diffusers' `load_lora_weights` reads."""
    return write_diffusers(export_updates(denoiser, adapter), PREFIXES[type(denoiser).__name__], directory)


def places(denoiser: nn.Module, form: str) -> dict[str, tuple[str, int, int]]:
    """File module path -> (project layer, its part, the number of parts) for a file of `form`."""
    found = {}
    for mapping in layer_maps(denoiser):
        for layer, paths in mapping.items():
            for index, path in enumerate(paths):
                found[path.replace(".", "_") if form == KOHYA else path] = (layer, index, len(paths))
    return found


def _key(form: str, path: str) -> str:
    return f"{KOHYA_PREFIX}{path}.lora_down.weight" if form == KOHYA else f"{path}.lora_A.weight"


def fit_problems(denoiser: nn.Module, lora: LoraFile) -> list[str]:
    """What of the file does not fit the denoiser: the first key naming no layer of it, or of another shape."""
    where, modules = places(denoiser, lora.form), dict(denoiser.named_modules())
    for path in sorted(lora.updates):
        update = lora.updates[path]
        if path not in where:
            return [f"lora={lora.source} does not fit this {type(denoiser).__name__}: its key {_key(lora.form, path)} "
                    "names no layer of it (a LoRA of another architecture?)"]
        layer, _, count = where[path]
        base = modules[layer].get_base_layer() if hasattr(modules[layer], "get_base_layer") else modules[layer]
        weight = base.weight
        wanted_down = (update.rank, *weight.shape[1:])
        wanted_up = (weight.shape[0] // count, update.rank, *([1] * (weight.ndim - 2)))
        if tuple(update.down.shape) != wanted_down or tuple(update.up.shape) != wanted_up:
            return [f"lora={lora.source} does not fit this {type(denoiser).__name__}: its key {_key(lora.form, path)} "
                    f"has down {tuple(update.down.shape)} and up {tuple(update.up.shape)}, the layer {layer} takes "
                    f"{wanted_down} and {wanted_up} (a LoRA of another architecture or size?)"]
    return []


def stacked(parts: dict[int, LowRank], count: int, rows: int) -> dict[str, torch.Tensor]:
    """One layer's update from its parts' (peft's tensor names): down projections stacked, up ones block-diagonal."""
    order = sorted(parts)
    down = torch.cat([parts[index].down for index in order])
    first = parts[order[0]].up
    up = first.new_zeros((rows * count, down.shape[0], *first.shape[2:]))
    column = 0
    for index in order:
        part = parts[index]
        up[index * rows:(index + 1) * rows, column:column + part.rank] = part.up * part.scale
        column += part.rank
    out = {"lora_A.weight": down, "lora_B.weight": up}
    magnitudes = [parts[index].magnitude for index in order]
    if any(m is not None for m in magnitudes):
        if len(order) != count or any(m is None for m in magnitudes):
            raise WeightsError("a DoRA file must hold the magnitudes of every part of a fused projection "
                               "(to_q, to_k and to_v)")
        out["lora_magnitude_vector"] = torch.cat(magnitudes, dim=-1 if magnitudes[0].ndim == 1 else 1)
    return out


def adapter_from_file(denoiser: nn.Module, lora: LoraFile) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """A peft config with one target and rank per layer (scale 1: the file's scale is in the up projections) and
    the adapter's tensors in the names `set_peft_model_state_dict` takes."""
    if problems := fit_problems(denoiser, lora):
        raise WeightsError(problems)
    where, modules = places(denoiser, lora.form), dict(denoiser.named_modules())
    grouped: dict[str, tuple[int, dict[int, LowRank]]] = {}
    for path, update in lora.updates.items():
        layer, index, count = where[path]
        grouped.setdefault(layer, (count, {}))[1][index] = update
    state, ranks = {}, {}
    for layer, (count, parts) in grouped.items():
        base = modules[layer].get_base_layer() if hasattr(modules[layer], "get_base_layer") else modules[layer]
        tensors = stacked(parts, count, base.weight.shape[0] // count)
        state.update({f"{layer}.{key}": value for key, value in tensors.items()})
        ranks[layer] = tensors["lora_A.weight"].shape[0]
    pattern = {re.escape(layer): rank for layer, rank in ranks.items()}
    first = next(iter(ranks.values()))
    config = LoraConfig(r=first, lora_alpha=first, target_modules=list(ranks), rank_pattern=pattern,
                        alpha_pattern=pattern, use_dora=any(key.endswith("lora_magnitude_vector") for key in state))
    return config, state


def load_adapter(denoiser: nn.Module, config, state: dict[str, torch.Tensor], adapter: str, source) -> None:
    """Add an adapter to the denoiser (next to any it has) and fill it with `state` (peft's names)."""
    inject_adapter_in_model(config, denoiser, adapter_name=adapter)
    result = set_peft_model_state_dict(denoiser, state, adapter_name=adapter)
    if result.unexpected_keys:
        raise WeightsError(f"lora={source}: {len(result.unexpected_keys)} of its tensors found no place in the "
                           f"denoiser (first: {result.unexpected_keys[0]})")


def import_lora(denoiser: nn.Module, path, adapter: str) -> LoraFile:
    """Read a LoRA file of diffusers', peft's or kohya's format into the denoiser as the adapter `adapter`."""
    lora = read_lora(path)
    config, state = adapter_from_file(denoiser, lora)
    load_adapter(denoiser, config, state, adapter, lora.source)
    return lora
