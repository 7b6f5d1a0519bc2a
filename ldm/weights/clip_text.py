"""CLIP text towers from local files: open_clip state dicts and Hugging Face `CLIPTextModel` weights.

Hugging Face's `CLIPTextModel` (`CLIPTextModelWithProjection`, or the text half of a `CLIPModel`)
is mapped to open_clip's `TextTransformer` names: q, k and v projections are concatenated into
one `in_proj_weight`, and `text_projection` is stored transposed (open_clip computes `x @ P`).
Files written by transformers 4.x put the tower under `text_model.`; 5.x leaves the prefix out.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ldm.weights.files import WeightsError, find_weights, read_state_dict

OPEN_CLIP_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
_HF_MARK = "embeddings.token_embedding.weight"
_HF_TOP = {
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "final_layer_norm.weight": "ln_final.weight",
    "final_layer_norm.bias": "ln_final.bias",
}
_HF_BLOCK = {  # inside encoder.layers.N -> inside transformer.resblocks.N
    "self_attn.out_proj.weight": "attn.out_proj.weight",
    "self_attn.out_proj.bias": "attn.out_proj.bias",
    "layer_norm1.weight": "ln_1.weight",
    "layer_norm1.bias": "ln_1.bias",
    "layer_norm2.weight": "ln_2.weight",
    "layer_norm2.bias": "ln_2.bias",
    "mlp.fc1.weight": "mlp.c_fc.weight",
    "mlp.fc1.bias": "mlp.c_fc.bias",
    "mlp.fc2.weight": "mlp.c_proj.weight",
    "mlp.fc2.bias": "mlp.c_proj.bias",
}
_HF_LAYER = re.compile(r"encoder\.layers\.(\d+)\.(.+)")
# a buffer that transformers < 4.31 saved, and the parts of a whole CLIPModel that are not the text tower
_HF_SKIPPED = ("embeddings.position_ids", "vision_model.", "visual_projection.", "logit_scale")
_ACTIVATIONS = {"quick_gelu": True, "gelu": False}  # hidden_act -> open_clip's quick_gelu
_BLOCK_INDEX = re.compile(r"transformer\.resblocks\.(\d+)\.")


class TextWeightsError(WeightsError, ValueError):
    """A text tower's weights file that does not fit the configured tower."""


@dataclass
class TextWeights:
    """A text tower's tensors under open_clip's names, the file they came from, and its Hugging Face config."""

    state: dict[str, torch.Tensor]
    source: Path
    hf_config: dict | None = None  # the CLIPTextConfig of a Hugging Face file, when a config.json came with it
    hugging_face: bool = False

    @property
    def layers(self) -> int:
        """How many residual blocks the file holds."""
        found = {int(m.group(1)) for key in self.state if (m := _BLOCK_INDEX.match(key))}
        return max(found) + 1 if found else 0

    @property
    def has_projection(self) -> bool:
        return "text_projection" in self.state or "text_projection.weight" in self.state


def read_text_weights(path: str | Path) -> TextWeights:
    """A weights file, a model directory or a diffusers pipeline directory (its `text_encoder/`)."""
    path = Path(path).expanduser()
    open_clip_file = next((path / name for name in OPEN_CLIP_FILES if (path / name).is_file()), None)
    if path.is_dir() and open_clip_file is not None:
        file, config = open_clip_file, None
    else:
        file, config = find_weights(path, subfolder="text_encoder")
    state = read_state_dict(file)
    if not is_hugging_face(state):
        return TextWeights(open_clip_text_state(state), file)
    if config is None and (file.parent / "config.json").is_file():
        config = json.loads((file.parent / "config.json").read_text())  # a file given inside its model directory
    return TextWeights(hugging_face_to_open_clip(state), file, text_config(config), hugging_face=True)


def is_hugging_face(state: dict[str, torch.Tensor]) -> bool:
    return _HF_MARK in state or f"text_model.{_HF_MARK}" in state


def open_clip_text_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The text tower's weights from a full open_clip CLIP, a custom-text CLIP, or a text-only state dict."""
    if state and all(key.startswith("module.") for key in state):
        state = {key[len("module."):]: value for key, value in state.items()}  # saved from DataParallel
    if any(key.startswith("text.") for key in state):
        # CustomTextCLIP, and the embedder's own state dict, keep the tower under `text.`
        state = {key[len("text."):]: value for key, value in state.items() if key.startswith("text.")}
    else:
        state = {key: value for key, value in state.items() if not key.startswith(("visual.", "logit_"))}
    state.pop("attn_mask", None)
    return state


def hugging_face_to_open_clip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a Hugging Face CLIP text tower to open_clip's names; unknown keys are kept, for the loader to name."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}  # (layer, weight|bias) -> {q, k, v}
    for key, value in state.items():
        key = key.removeprefix("text_model.")
        if key.startswith(_HF_SKIPPED):
            continue
        layer = _HF_LAYER.fullmatch(key)
        if key in _HF_TOP:
            out[_HF_TOP[key]] = value
        elif key == "text_projection.weight":
            out["text_projection"] = value.t().contiguous()  # Linear stores (out, in); open_clip's P is (in, out)
        elif layer and layer.group(2) in _HF_BLOCK:
            out[f"transformer.resblocks.{layer.group(1)}.{_HF_BLOCK[layer.group(2)]}"] = value
        elif layer and (attn := re.fullmatch(r"self_attn\.([qkv])_proj\.(weight|bias)", layer.group(2))):
            qkv.setdefault((layer.group(1), attn.group(2)), {})[attn.group(1)] = value
        else:
            out[key] = value
    for (index, kind), parts in qkv.items():
        if set(parts) == {"q", "k", "v"}:
            # nn.MultiheadAttention keeps q, k and v stacked in this order
            out[f"transformer.resblocks.{index}.attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
        else:
            out.update({f"encoder.layers.{index}.self_attn.{name}_proj.{kind}": v for name, v in parts.items()})
    return out


def text_config(config: dict | None) -> dict | None:
    """The CLIPTextConfig inside a config.json (a CLIPModel's `text_config`), or None."""
    if config is None:
        return None
    if config.get("model_type") == "clip" and isinstance(config.get("text_config"), dict):
        return config["text_config"]
    return config if config.get("model_type", "clip_text_model") == "clip_text_model" else None


def quick_gelu_of(weights: TextWeights) -> bool | None:
    """Whether the file's tower uses QuickGELU, from its config.json; None when no config came with it."""
    if weights.hf_config is None:
        return None
    act = weights.hf_config.get("hidden_act", "quick_gelu")  # CLIPTextConfig's default
    if act not in _ACTIVATIONS:
        raise TextWeightsError(f"{weights.source}: hidden_act={act} in its config.json; open_clip's text tower runs "
                               f"{' or '.join(_ACTIVATIONS)}")
    return _ACTIVATIONS[act]


def check_hf_config(weights: TextWeights, width: int, heads: int) -> None:
    """Compare what the weights' shapes cannot show (the number of heads) and the width with the configured tower."""
    config = weights.hf_config or {}
    found = {"hidden_size": (config.get("hidden_size"), width, "width"),
             "num_attention_heads": (config.get("num_attention_heads"), heads, "heads"),
             "layer_norm_eps": (config.get("layer_norm_eps", 1e-5), 1e-5, None)}
    problems = []
    for key, (value, expected, text_key) in found.items():
        if value is not None and value != expected:
            fix = f"set text_cfg.{text_key}={value} or pick the model_name of this tower" if text_key else \
                "open_clip's layer norms use 1e-5"
            problems.append(f"{weights.source}: its config.json has {key}={value}, the configured tower {expected}: "
                            f"{fix}")
    if problems:
        raise TextWeightsError(problems)


__all__ = ["TextWeights", "TextWeightsError", "read_text_weights", "is_hugging_face", "open_clip_text_state",
           "hugging_face_to_open_clip", "text_config", "quick_gelu_of", "check_hf_config"]
