"""Stable Diffusion UNet weights (SD-1.x, SD-2.x) for ldm.models.unet.UNet, and export to diffusers.

Reads a diffusers `UNet2DConditionModel` (a model directory, a pipeline directory with `unet/`, or
one file with its keys) and original checkpoints (`model.diffusion_model.input_blocks.1.1...`, or
the same keys without `model.` or bare). The layout is told from the keys. The project's fused
projections stack the diffusers / original ones along the output dimension: self-attention's `to_qkv`
is `to_q`, `to_k` and `to_v`, cross-attention's `to_kv` is `to_k` and `to_v`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save
from torch import nn

from ldm.utils.files import atomic_write
from ldm.weights.files import (
    ABSENT,
    LEVEL_TIME,
    Conventions,
    WeightsError,
    find_weights,
    load_mapped,
    read_state_dict,
    unwrapped_names,
    with_prefix,
)

ORIGINAL_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
DIFFUSERS = 0
ORIGINAL = 1

# ResBlock parameter paths: project -> (diffusers, original)
RES_BLOCK_NAMES = {"in_layers.0": ("norm1", "in_layers.0"), "in_layers.2": ("conv1", "in_layers.2"),
                   "emb_layers.1": ("time_emb_proj", "emb_layers.1"), "out_norm": ("norm2", "out_layers.0"),
                   "out_layers.2": ("conv2", "out_layers.3"), "skip": ("conv_shortcut", "skip_connection")}

# the time convention of a UNet this project exported (diffusers skips config keys starting with "_"); a file
# without it is Stable Diffusion's, trained on the integer level k
TIME_SCALE_KEY = "_ldm_time_scale"

# diffusers config.json entries the project's UNet has no option for, with the only value it implements
FIXED_CONFIG = {"_class_name": "UNet2DConditionModel", "center_input_sample": False, "flip_sin_to_cos": True,
                "freq_shift": 0, "mid_block_type": "UNetMidBlock2DCrossAttn", "only_cross_attention": False,
                "downsample_padding": 1, "mid_block_scale_factor": 1, "act_fn": "silu", "norm_num_groups": 32,
                "norm_eps": 1e-5, "encoder_hid_dim": None, "encoder_hid_dim_type": None, "dual_cross_attention": False,
                "class_embed_type": None, "class_embeddings_concat": False, "addition_embed_type": None,
                "num_class_embeds": None, "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0,
                "time_embedding_type": "positional", "time_embedding_dim": None, "time_embedding_act_fn": None,
                "timestep_post_act": None, "time_cond_proj_dim": None, "conv_in_kernel": 3, "conv_out_kernel": 3,
                "attention_type": "default", "cross_attention_norm": None, "reverse_transformer_layers_per_block": None}


def kind(block: nn.Module) -> str:
    """A UNet block's kind, by its class name: a reader never imports the network it fills."""
    return type(block).__name__


def block_names(unet: nn.Module) -> list[tuple[nn.Module, str, tuple[str, str]]]:
    """Every block of `unet`: (module, its project name, (its diffusers name, its original name))."""
    names = [(unet.conv_in, "conv_in", ("conv_in", "input_blocks.0.0")),
             (unet.time_embed.mlp[0], "time_embed.mlp.0", ("time_embedding.linear_1", "time_embed.0")),
             (unet.time_embed.mlp[2], "time_embed.mlp.2", ("time_embedding.linear_2", "time_embed.2")),
             (unet.out[0], "out.0", ("conv_norm_out", "out.0")), (unet.out[2], "out.2", ("conv_out", "out.2"))]
    for side, stages, original in (("down", unet.down_stages, "input_blocks"), ("up", unet.up_stages, "output_blocks")):
        level = index = 0
        for number, stage in enumerate(stages):
            original_number = number + 1 if side == "down" else number  # input_blocks.0 is conv_in
            for position, layer in enumerate(stage):
                group = (f"{side}samplers.0" if kind(layer) in ("Downsample", "Upsample")
                         else f"resnets.{index}" if kind(layer) == "ResBlock" else f"attentions.{index}")
                names.append((layer, f"{side}_stages.{number}.{position}",
                              (f"{side}_blocks.{level}.{group}", f"{original}.{original_number}.{position}")))
            # a stage that changes the resolution ends a diffusers block
            if any(kind(layer) in ("Downsample", "Upsample") for layer in stage):
                level, index = level + 1, 0
            else:
                index += 1
    for position, layer in enumerate(unet.middle):
        group = f"resnets.{position // 2}" if kind(layer) == "ResBlock" else "attentions.0"
        names.append((layer, f"middle.{position}", (f"mid_block.{group}", f"middle_block.{position}")))
    return names


def _local_names(module: nn.Module, local: str, layout: int) -> list[str]:
    """The source names of one parameter of a block (two or three for a fused projection, stacked in order)."""
    if kind(module) == "AttentionBlock":
        raise WeightsError("Stable Diffusion weights need the cross-attention blocks of a UNet with "
                           "model.context_dim set (768 for SD-1.x, 1024 for SD-2.x)")
    path, parameter = local.rsplit(".", 1) if "." in local else ("", local)
    if kind(module) == "ResBlock":
        path = RES_BLOCK_NAMES[path][layout]
    elif kind(module) == "Downsample":
        path = ("conv", "op")[layout]
    elif kind(module) == "SpatialTransformer":
        path = path.replace("blocks.", "transformer_blocks.", 1) if path.startswith("blocks.") else path
        if path.endswith(".to_out"):
            path += ".0"
        for fused in (".to_qkv", ".to_kv"):
            if path.endswith(fused):
                stem = path[: -len(fused)]
                return [f"{stem}.to_{part}.{parameter}" for part in fused[len(".to_"):]]
    return [f"{path}.{parameter}" if path else parameter]


def key_map(unet: nn.Module, layout: int) -> dict[str, list[str]]:
    """Project parameter name -> its source names in `layout` (DIFFUSERS or ORIGINAL)."""
    mapping = {}
    for module, ours, theirs in block_names(unet):
        for local in unwrapped_names(module.state_dict()):
            mapping[f"{ours}.{local}"] = [f"{theirs[layout]}.{name}" for name in _local_names(module, local, layout)]
    missing = set(unwrapped_names(unet.state_dict())) - set(mapping)
    if missing:
        raise WeightsError(f"model=UNet: Stable Diffusion weights have no counterpart for {sorted(missing)[:3]}; "
                           f"set model.vector_dim=null (SD UNets take no vector condition)")
    return mapping


def layer_map(unet: nn.Module, layout: int = DIFFUSERS) -> dict[str, list[str]]:
    """Project layer name -> its module paths in `layout`, for adapters (a fused projection's parts stack by rows)."""
    suffix = ".weight"
    return {ours[: -len(suffix)]: [name[: -len(suffix)] for name in sources]
            for ours, sources in key_map(unet, layout).items() if ours.endswith(suffix)}


def _split_layout(state: dict[str, torch.Tensor], source: Path) -> tuple[int, dict[str, torch.Tensor]]:
    for prefix in ORIGINAL_PREFIXES:
        inner = with_prefix(state, prefix)
        if inner:
            return ORIGINAL, inner
    if "input_blocks.0.0.weight" in state:
        return ORIGINAL, state
    if "conv_in.weight" in state and any(key.startswith("down_blocks.") for key in state):
        return DIFFUSERS, state
    raise WeightsError(f"{source} is not a Stable Diffusion UNet: it has neither diffusers keys (conv_in.weight, "
                       f"down_blocks.*) nor original ones (model.diffusion_model.input_blocks.*); its first keys "
                       f"are {', '.join(sorted(state)[:3])}")


def _shape_hints(unet: nn.Module, state: dict[str, torch.Tensor], mapping: dict[str, list[str]]) -> list[str]:
    """What to set when the projections or the text width of the weights differ from the config's."""
    own = unet.state_dict()

    def first(suffix: str):  # the first weight of this kind, in the model and in the file
        return next(((own[ours], state[sources[0]]) for ours, sources in mapping.items()
                     if ours.endswith(suffix) and sources[0] in state), (None, None))

    hints = []
    mine, theirs = first("proj_in.weight")
    if theirs is not None and mine.ndim != theirs.ndim:
        linear = theirs.ndim == 2
        hints.append(f"model.use_linear_projection={str(linear).lower()} (the weights' proj_in is "
                     f"{'a linear layer' if linear else 'a 1x1 conv'})")
    mine, theirs = first("attn2.to_kv.weight")
    if theirs is not None and mine.shape[1] != theirs.shape[1]:
        hints.append(f"model.context_dim={theirs.shape[1]} (the width of the text tokens the weights attend to)")
    return hints


def load_unet(unet: nn.Module, path: str | Path) -> None:
    """Load SD-1.x / SD-2.x UNet weights from a diffusers directory or file, or an original checkpoint."""
    try:
        file, config = find_weights(path, subfolder="unet")
    except WeightsError as err:
        raise WeightsError([f"model.weights={path}: {line}" for line in err.problems] + [
            "model.weights takes a diffusers UNet directory (config.json + diffusion_pytorch_model.safetensors), "
            "a pipeline directory holding unet/, or one checkpoint file such as v1-5-pruned.safetensors"]) from err
    problems = config_problems(unet, config) if config is not None else []
    problems += time_problems(unet, config)
    if problems:
        raise WeightsError([f"model.weights={path}: {line}" for line in problems])
    layout, state = _split_layout(read_state_dict(file), file)
    mapping = key_map(unet, layout)
    hints = _shape_hints(unet, state, mapping)
    if hints:
        raise WeightsError(f"model.weights={path} does not fit the configured UNet: set {'; '.join(hints)}")
    wanted = {name for sources in mapping.values() for name in sources}
    missing = sorted(wanted - set(state))
    unexpected = sorted(set(state) - wanted)
    problems = [f"{len(missing)} weights missing from {file} (first: {', '.join(missing[:3])})"] if missing else []
    if unexpected:
        problems.append(f"{len(unexpected)} weights in {file} that the configured UNet does not have "
                        f"(first: {', '.join(unexpected[:3])})")
    if problems:
        raise WeightsError(problems + ["does the model config (channels, channel_mult, num_res_blocks, "
                                       "attention_resolutions, transformer_depth) match the weights?"])
    merged = {ours: state[sources[0]] if len(sources) == 1 else torch.cat([state[name] for name in sources])
              for ours, sources in mapping.items()}
    load_mapped(unet, merged, file)


def _per_level(value, levels: int) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value] * levels


def diffusers_config(unet: nn.Module) -> dict:
    """The UNet2DConditionModel config.json of `unet`'s architecture."""
    s = unet.settings
    problems = []
    if not s["context_dim"]:
        problems.append("model.context_dim=null: its attention layers are plain self-attention, which diffusers' "
                        "UNet2DConditionModel blocks (attending to text tokens) do not compute; this UNet cannot be "
                        "exported (a text-conditioned UNet, model.context_dim set, can)")
    if s["vector_dim"]:
        problems.append(f"model.vector_dim={s['vector_dim']}: its vector condition (e.g. conditioner=class's table) "
                        "is not written as diffusers' class embedding; set model.vector_dim=null")
    if problems:
        raise WeightsError([f"diffusers' UNet2DConditionModel cannot express this UNet: {line}" for line in problems])
    widths = [s["channels"] * mult for mult in s["channel_mult"]]
    attention = [2 ** level in s["attention_resolutions"] for level in range(len(widths))]
    size = s["input_size"]
    return FIXED_CONFIG | {
        "sample_size": list(size) if isinstance(size, (list, tuple)) else size or 64,
        "in_channels": s["in_channels"] + s["concat_channels"], "out_channels": s["out_channels"],
        "block_out_channels": widths, "layers_per_block": s["num_res_blocks"],
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)],
        "cross_attention_dim": s["context_dim"], "attention_head_dim": [_heads_or_one(unet, width) for width in widths],
        "use_linear_projection": s["use_linear_projection"], "transformer_layers_per_block": s["transformer_depth"],
        "resnet_time_scale_shift": "scale_shift" if s["use_scale_shift_norm"] else "default"}


def _heads_or_one(unet: nn.Module, width: int) -> int:
    # levels without attention still need a head count in config.json, which nothing reads
    try:
        return unet.heads(width)
    except ValueError:
        return 1


def fixed_config_problems(config: dict) -> list[str]:
    """The config.json entries (time sinusoids, activation, ...) that model=UNet has no option for."""
    return [f"config.json has {key}={config[key]!r}, which model=UNet does not implement (it needs {value!r})"
            for key, value in FIXED_CONFIG.items() if key in config and config[key] != value]


def trained_time_scale(config: dict | None) -> float:
    """The model.time_scale the file's network was trained with: 1 (the level k) unless it says otherwise."""
    return float((config or {}).get(TIME_SCALE_KEY, 1))


def time_problems(unet: nn.Module, config: dict | None) -> list[str]:
    scale = trained_time_scale(config)
    if unet.settings["time_scale"] == scale:
        return []
    if scale == 1:
        return ["the weights are Stable Diffusion's, trained on the integer DDPM level k: set model.time_scale=1 "
                "with schedule.time_input=level"]
    return [f"the weights were exported with model.time_scale={scale:g}: set model.time_scale={scale:g}"]


def conventions(path: str | Path) -> Conventions:
    """What a UNet file fixes beyond its shapes: its time input, and config.json entries model=UNet lacks."""
    _, config = find_weights(path, subfolder="unet")
    scale = trained_time_scale(config)
    if scale == 1:
        found = Conventions("a Stable Diffusion UNet, trained on the integer DDPM level k", dict(LEVEL_TIME))
    else:  # one of this project's UNets, trained on t in [0, 1]
        found = Conventions(f"a UNet exported by this project, trained on t * {scale:g} for t in [0, 1]",
                            {"model.time_scale": (scale,), "schedule.time_input": ("unit", ABSENT)})
    found.problems = fixed_config_problems(config or {})
    return found


def config_problems(unet: nn.Module, config: dict) -> list[str]:
    """One line per way a diffusers config.json differs from `unet`'s architecture, naming what to set."""
    s = unet.settings
    problems = fixed_config_problems(config)
    widths = list(config.get("block_out_channels", []))
    levels = len(widths)
    mine = diffusers_config(unet) if s["context_dim"] and not s["vector_dim"] else None
    if mine is None:
        problems.append("config.json describes a text-conditioned UNet: set model.context_dim="
                        f"{config.get('cross_attention_dim')} and model.vector_dim=null")
        return problems
    if widths != mine["block_out_channels"]:
        mult = [width // widths[0] for width in widths] if widths else []
        problems.append(f"config.json has block_out_channels={widths}: set model.channels={widths[:1] and widths[0]} "
                        f"model.channel_mult={mult}")
    down_types = list(config.get("down_block_types", []))
    attention = [2 ** level for level, kind in enumerate(down_types) if kind.startswith("CrossAttn")]
    if down_types != mine["down_block_types"]:
        problems.append(f"config.json has down_block_types={down_types}: set model.attention_resolutions={attention}")
    if list(config.get("up_block_types", [])) != [kind.replace("Down", "Up") for kind in reversed(down_types)]:
        problems.append(f"config.json has up_block_types={config.get('up_block_types')}, which do not mirror "
                        f"down_block_types; model=UNet builds mirrored blocks only")
    # config.json key -> the model key that sets it (in_channels counts the concatenated channels too)
    settings = {"in_channels": "in_channels", "out_channels": "out_channels", "layers_per_block": "num_res_blocks",
                "cross_attention_dim": "context_dim", "transformer_layers_per_block": "transformer_depth",
                "use_linear_projection": "use_linear_projection"}
    defaults = {"transformer_layers_per_block": 1, "use_linear_projection": False}
    for key, setting in settings.items():
        values = _per_level(config.get(key, defaults.get(key)), levels)
        if len({str(value) for value in values}) > 1:
            problems.append(f"config.json has {key}={values}, different per level, which model=UNet does not implement")
        elif values and values[0] != mine[key]:
            value = str(values[0]).lower() if isinstance(values[0], bool) else values[0]
            extra = " (minus model.concat_channels)" if key == "in_channels" and s["concat_channels"] else ""
            problems.append(f"config.json has {key}={value}, the model {mine[key]}: set model.{setting}={value}{extra}")
    shift = config.get("resnet_time_scale_shift", "default")
    if shift != mine["resnet_time_scale_shift"]:
        problems.append(f"config.json has resnet_time_scale_shift={shift!r}: set "
                        f"model.use_scale_shift_norm={str(shift == 'scale_shift').lower()}")
    problems += _head_problems(unet, config, widths, attention)
    return problems


def _head_problems(unet: nn.Module, config: dict, widths: list[int], attention: list[int]) -> list[str]:
    # diffusers spells the number of heads `attention_head_dim` (num_attention_heads wins when set)
    heads = _per_level(config.get("num_attention_heads") or config.get("attention_head_dim", 8), len(widths))
    levels = [level for level in range(len(widths)) if 2 ** level in attention] + [len(widths) - 1]  # + middle
    try:
        agree = all(unet.heads(widths[level]) == heads[level] for level in levels)
    except ValueError:
        agree = False
    if agree:
        return []
    head_widths = {widths[level] // heads[level] for level in levels}
    if len({heads[level] for level in levels}) == 1:
        fix = f"model.num_heads={heads[levels[0]]} model.num_head_channels=-1"
    elif len(head_widths) == 1:
        fix = f"model.num_head_channels={head_widths.pop()}"
    else:
        return [f"config.json has attention heads {heads} for widths {widths}: neither a fixed number nor a "
                f"fixed width of heads, which model=UNet does not implement"]
    return [f"config.json has attention heads {heads} for widths {widths}: set {fix}"]


def to_diffusers(unet: nn.Module, directory: str | Path, notes: dict | None = None) -> Path:
    """Write `unet` as a diffusers UNet2DConditionModel directory (config.json + safetensors).

    The diffusers model takes `t * model.time_scale` as its timestep; config.json keeps the time scale for
    loading the directory back (`conventions`), and `notes` (more `_ldm_*` keys, which diffusers ignores).
    """
    directory = Path(directory)
    config = diffusers_config(unet) | {TIME_SCALE_KEY: unet.settings["time_scale"], **(notes or {})}
    own = unet.state_dict()
    tensors = {}
    for ours, sources in key_map(unet, DIFFUSERS).items():
        for name, part in zip(sources, own[ours].chunk(len(sources)), strict=True):
            tensors[name] = part.detach().cpu().contiguous().clone()
    with atomic_write(directory / "diffusion_pytorch_model.safetensors") as handle:
        handle.write(save(tensors))
    with atomic_write(directory / "config.json") as handle:
        handle.write(json.dumps(config, indent=2).encode())
    return directory
