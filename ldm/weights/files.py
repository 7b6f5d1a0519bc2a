"""Reading published weight files from local paths: diffusers model directories and single files.

Formats: a diffusers directory (`config.json` + `diffusion_pytorch_model.safetensors` or `.bin`,
or `model.safetensors` for transformers models), a diffusers pipeline directory with the part in a
subfolder (`vae/`, `unet/`, `transformer/`, `text_encoder/`), or one file (`.safetensors`, `.pt`,
`.pth`, `.ckpt`, `.bin`) holding a state dict, possibly under "state_dict", "model" or "module".
Pickled files are read with `weights_only=True`: they can hold tensors and containers, never code.
"""

from __future__ import annotations

import json
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ldm.utils.errors import UserError

STATE_DICT_FILES = ("diffusion_pytorch_model.safetensors", "model.safetensors",
                    "diffusion_pytorch_model.bin", "pytorch_model.bin")
PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")
WRAPPER_KEYS = ("state_dict", "model", "module")
ABSENT = "<absent>"  # an accepted "value" of a config key: the key may be missing (a schedule without time_input)
# networks trained with DDPM's integer steps (Stable Diffusion, DiT) take the level k itself as time
LEVEL_TIME = {"model.time_scale": (1,), "schedule.time_input": ("level",)}


@dataclass
class Conventions:
    """What a weight file fixes beyond its tensors' shapes, for the config checks (ldm/checks/weights.py).

    `settings`: config key -> the values under which the network computes what it was trained to (the first
    one is suggested); `class_table`: (num_classes + 1, width) of the class table the file holds;
    `problems`: what the file's config.json asks for that the project's network does not implement.
    """

    description: str
    settings: dict[str, tuple] = field(default_factory=dict)
    class_table: tuple[int, int] | None = None
    problems: list[str] = field(default_factory=list)


class WeightsError(UserError):
    """A weights file that is missing, unreadable, or does not fit the model it was given to."""


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of one weights file, on the CPU, with any wrapper dict ("state_dict", ...) removed."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        if path.suffix not in PICKLE_SUFFIXES:
            raise WeightsError(f"weights file {path}: unknown format {path.suffix!r}; give a .safetensors file, "
                               f"a torch file ({', '.join(PICKLE_SUFFIXES)}) or a diffusers directory")
        loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except WeightsError:
        raise
    except pickle.UnpicklingError as err:
        raise WeightsError(f"weights file {path} holds Python objects other than tensors, so it is refused "
                           f"(loading them could run code); convert it to .safetensors") from err
    except Exception as err:  # noqa: BLE001 - damaged files fail in many ways
        raise WeightsError(f"weights file {path} is damaged or not a weights file: {type(err).__name__}: "
                           f"{str(err).splitlines()[0] if str(err) else ''}") from err
    while isinstance(loaded, dict):
        inner = next((loaded[key] for key in WRAPPER_KEYS if isinstance(loaded.get(key), dict)), None)
        if inner is None:
            break
        loaded = inner
    tensors = {key: value for key, value in loaded.items() if isinstance(value, torch.Tensor)} \
        if isinstance(loaded, dict) else {}
    if not tensors:
        raise WeightsError(f"weights file {path} holds no tensors")
    return tensors


def tensor_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """The shape of each tensor of one weights file, read from its header (a pickled file is memory-mapped)."""
    path = Path(path).expanduser()
    if path.suffix == ".safetensors" and path.is_file():
        try:
            with safe_open(str(path), framework="pt") as handle:
                return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}  # noqa: SIM118
        except Exception as err:  # noqa: BLE001 - read_state_dict names what is wrong with the file
            raise WeightsError(f"weights file {path} is damaged or not a weights file: {err}") from err
    return {key: tuple(value.shape) for key, value in read_state_dict(path).items()}


def find_weights(path: str | Path, subfolder: str | None = None) -> tuple[Path, dict | None]:
    """The weights file of a part and its diffusers config (None for a single file).

    `path` is a file, a model directory, or a pipeline directory whose `subfolder` holds the part.
    """
    path = Path(path).expanduser()
    if path.is_file():
        return path, None
    if not path.exists():
        raise WeightsError(f"weights {path} do not exist: give a weights file or a diffusers directory")
    candidates = [path] + ([path / subfolder] if subfolder else [])
    for directory in candidates:
        for name in STATE_DICT_FILES:
            if (directory / name).is_file():
                config_file = directory / "config.json"
                config = json.loads(config_file.read_text()) if config_file.is_file() else None
                return directory / name, config
    looked = " or ".join(str(directory) for directory in candidates)
    raise WeightsError(f"no weights in {looked}: a diffusers directory holds config.json and one of "
                       f"{', '.join(STATE_DICT_FILES)}")


def unwrapped_names(names) -> list[str]:
    """State-dict names as the network has them without adapters around its layers: peft keeps a wrapped layer's own
    tensors under `LAYER.base_layer.*` and its adapters' beside them, which are left out."""
    names = list(names)
    wrapped = {name.split(".base_layer.")[0] for name in (f".{n}" for n in names) if ".base_layer." in name}
    plain = []
    for name in names:
        if ".base_layer." in f".{name}":
            plain.append(name.replace("base_layer.", "", 1) if name.startswith("base_layer.")
                         else name.replace(".base_layer.", ".", 1))
        elif not any(f".{name}".startswith(f"{layer}.") for layer in wrapped):
            plain.append(name)
    return plain


def with_prefix(state_dict: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries under `prefix` (e.g. "first_stage_model."), with the prefix removed."""
    return {key[len(prefix):]: value for key, value in state_dict.items() if key.startswith(prefix)}


def load_mapped(module: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: str | Path) -> None:
    """Load a state dict already mapped to `module`'s names, naming missing, unexpected and mis-shaped keys."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shapes = [f"{key}: file {tuple(state_dict[key].shape)}, model {tuple(own[key].shape)}"
              for key in own if key in state_dict and state_dict[key].shape != own[key].shape]
    problems = []
    if missing:
        problems.append(f"{len(missing)} weights missing from {source} (first: {', '.join(missing[:3])})")
    if unexpected:
        problems.append(f"{len(unexpected)} weights in {source} that the model does not have "
                        f"(first: {', '.join(unexpected[:3])})")
    if shapes:
        problems.append(f"{len(shapes)} weights of {source} have another shape than the model's "
                        f"(first: {'; '.join(shapes[:3])}); does the config match the weights?")
    if problems:
        raise WeightsError([f"{type(module).__name__}: {line}" for line in problems])
    module.load_state_dict({key: value.to(own[key].dtype) for key, value in state_dict.items()})
