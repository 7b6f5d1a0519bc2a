"""LoRA files as users exchange them: diffusers' and peft's, and kohya's (sd-scripts), read and written.

- diffusers / peft: `unet.` or `transformer.` (or peft's `base_model.model.`) before a module path of the
  diffusers network, then `.lora_A.weight` (down, rank x in), `.lora_B.weight` (up, out x rank) and, for DoRA,
  `.lora_magnitude_vector`. The scale alpha / rank comes from the file's `lora_adapter_metadata` (diffusers),
  peft's `adapter_config.json` beside it, or `.alpha` tensors; without any it is 1 (alpha = rank).
- kohya: `lora_unet_` before the module path with its dots written as underscores, then `.lora_down.weight`,
  `.lora_up.weight` and `.alpha` (the scale is alpha / rank).

A file reads into one `LowRank` update per module path of the file's network; which of the project's layers a
path is, is the denoiser's key map's business (ldm/weights/unet.py, dit.py). Text-encoder parts are left out.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from peft.utils.other import get_pattern_key
from safetensors import safe_open
from safetensors.torch import save

from ldm.utils.files import atomic_write
from ldm.weights.files import WeightsError, read_state_dict

log = logging.getLogger(__name__)

DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"
PEFT_FILE, PEFT_CONFIG = "adapter_model.safetensors", "adapter_config.json"
METADATA_KEY = "lora_adapter_metadata"  # diffusers' entry in the safetensors header
NETWORK_PREFIXES = ("unet.", "transformer.", "base_model.model.")
TEXT_PREFIXES = ("text_encoder", "te_", "te1_", "te2_", "lora_te")
KOHYA_PREFIX = "lora_unet_"
KOHYA, DIFFUSERS = "kohya", "diffusers/peft"


@dataclass
class LowRank:
    """One module's update: scale * up @ down (convolutions: up is 1x1, down has the layer's kernel), and DoRA's
    magnitude (one entry per output row) where the file has one."""

    down: torch.Tensor
    up: torch.Tensor
    scale: float
    magnitude: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        return self.down.shape[0]


@dataclass
class LoraFile:
    source: Path
    form: str                     # KOHYA or DIFFUSERS
    updates: dict[str, LowRank]   # module path (kohya: with underscores) -> its update


def locate(path: str | Path) -> Path:
    """The weights file of a LoRA: the file itself, or a diffusers / peft directory holding it."""
    path = Path(path).expanduser()
    if path.is_dir():
        for name in (DIFFUSERS_FILE, PEFT_FILE):
            if (path / name).is_file():
                return path / name
        raise WeightsError(f"lora={path}: no {DIFFUSERS_FILE} or {PEFT_FILE} in the directory")
    if not path.is_file():
        raise WeightsError(f"lora={path}: no such file or directory")
    return path


def read_lora(path: str | Path) -> LoraFile:
    file = locate(path)
    state = read_state_dict(file)
    if any(key.startswith(KOHYA_PREFIX) for key in state):
        return LoraFile(file, KOHYA, kohya_updates(state, file))
    if any(".lora_A." in key or ".lora_B." in key for key in state):
        return LoraFile(file, DIFFUSERS, peft_updates(state, file, adapter_settings(file)))
    raise WeightsError(f"lora={path}: not a LoRA file of diffusers', peft's or kohya's format (no *.lora_A.weight or "
                       f"lora_unet_*.lora_down.weight keys); its first keys are {', '.join(sorted(state)[:3])}")


def adapter_settings(file: Path) -> dict:
    """The rank and alpha settings stored with the file (diffusers' metadata or peft's adapter_config.json)."""
    if (file.parent / PEFT_CONFIG).is_file() and file.name == PEFT_FILE:
        return json.loads((file.parent / PEFT_CONFIG).read_text())
    if file.suffix != ".safetensors":
        return {}
    with safe_open(str(file), framework="pt") as handle:
        raw = (handle.metadata() or {}).get(METADATA_KEY)
    if not raw:
        return {}
    settings = json.loads(raw)
    for prefix in ("unet.", "transformer."):  # diffusers packs each network's settings under its prefix
        inner = {key[len(prefix):]: value for key, value in settings.items() if key.startswith(prefix)}
        if inner:
            return inner
    return settings


def scale_of(module: str, rank: int, settings: dict, alphas: dict[str, float]) -> float:
    """alpha / rank of one module, as peft computes it from a LoraConfig's settings (alpha / sqrt(rank) for rsLoRA)."""
    if module in alphas:
        return alphas[module] / rank
    if "lora_alpha" not in settings:
        return 1.0
    alpha_key = get_pattern_key(list(settings.get("alpha_pattern") or {}), module)
    alpha = (settings.get("alpha_pattern") or {}).get(alpha_key, settings["lora_alpha"])
    return alpha / math.sqrt(rank) if settings.get("use_rslora") else alpha / rank


def _network_key(key: str) -> str | None:
    """A key without its network prefix; None for a text encoder's."""
    for prefix in NETWORK_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix):]
    return None if key.startswith(TEXT_PREFIXES) else key


def peft_updates(state: dict[str, torch.Tensor], file: Path, settings: dict) -> dict[str, LowRank]:
    parts: dict[str, dict[str, torch.Tensor]] = {}
    skipped = 0
    for key, value in state.items():
        inner = _network_key(key)
        if inner is None:
            skipped += 1
            continue
        for suffix, part in ((".lora_A.weight", "down"), (".lora_B.weight", "up"), (".lora_magnitude_vector", "m"),
                             (".lora_magnitude_vector.weight", "m"), (".alpha", "alpha")):
            if inner.endswith(suffix):
                parts.setdefault(inner[: -len(suffix)], {})[part] = value
                break
        else:
            raise WeightsError(f"lora={file}: {key} is no LoRA tensor (lora_A / lora_B weight, lora_magnitude_vector "
                               "or alpha); a LoRA with biases or another adapter type is not read")
    if skipped:
        log.info("lora=%s: %d text-encoder tensors left out (the denoiser's adapters only)", file, skipped)
    alphas = {module: float(found["alpha"]) for module, found in parts.items() if "alpha" in found}
    return {module: _update(module, found, file, scale_of(module, found["down"].shape[0], settings, alphas))
            for module, found in parts.items() if set(found) - {"alpha"}}


def kohya_updates(state: dict[str, torch.Tensor], file: Path) -> dict[str, LowRank]:
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if key.startswith(TEXT_PREFIXES):
            continue
        module, _, tail = key.partition(".")
        names = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}
        if not key.startswith(KOHYA_PREFIX) or tail not in names:
            raise WeightsError(f"lora={file}: {key} is no kohya LoRA tensor of the UNet (lora_unet_*.lora_down.weight, "
                               ".lora_up.weight or .alpha); DoRA (dora_scale) and LoHa/LoKr files are not read")
        parts.setdefault(module[len(KOHYA_PREFIX):], {})[names[tail]] = value
    updates = {}
    for module, found in parts.items():
        rank = found["down"].shape[0] if "down" in found else 1
        alpha = float(found["alpha"]) if "alpha" in found else rank  # kohya's default alpha is the rank
        updates[module] = _update(KOHYA_PREFIX + module, found, file, alpha / rank)
    return updates


def _update(module: str, found: dict[str, torch.Tensor], file: Path, scale: float) -> LowRank:
    if "down" not in found or "up" not in found:
        raise WeightsError(f"lora={file}: {module} has a {'down' if 'down' in found else 'up'} projection without "
                           "its partner")
    return LowRank(found["down"].float(), found["up"].float(), scale, found["m"].float() if "m" in found else None)


def write_diffusers(updates: dict[str, LowRank], prefix: str, directory: str | Path) -> Path:
    """`directory/pytorch_lora_weights.safetensors` in diffusers' peft naming, each module's scale folded into its up
    projection (so that alpha = rank, what diffusers assumes without metadata)."""
    tensors = {}
    for module, update in updates.items():
        tensors[f"{prefix}.{module}.lora_A.weight"] = update.down.contiguous()
        tensors[f"{prefix}.{module}.lora_B.weight"] = (update.up * update.scale).contiguous()
        if update.magnitude is not None:
            tensors[f"{prefix}.{module}.lora_magnitude_vector"] = update.magnitude.contiguous()
    path = Path(directory) / DIFFUSERS_FILE
    with atomic_write(path) as handle:
        handle.write(save({key: value.detach().cpu().clone() for key, value in tensors.items()},
                          metadata={"format": "pt"}))
    return path
