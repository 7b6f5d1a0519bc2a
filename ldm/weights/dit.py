"""DiT weights: the published checkpoint (`DiT-XL-2-256x256.pt`) and diffusers' `DiTTransformer2DModel`.

Both read into this project's `DiT`, and their class table (num_classes + 1 rows, the null class
last) into `ClassEmbedder`; `to_diffusers` writes a diffusers directory back. Beyond the tensors:

- position: both add the fixed 2-D sin-cos embedding of model.pos_embed_layout=col_sin_cos; the
  published file also stores it, and it is checked, not loaded.
- time: both take the integer level k (schedule.time_input=level, model.time_scale=1). The published
  code's sinusoids are 10000^(-i/128) (model.time_frequency_shift=0), diffusers' 10000^(-i/127)
  (shift 1). A diffusers file needs shift 1; on the published file, the shift picks whose outputs are
  reproduced (the paper's code, or diffusers' on the converted weights).
  A DiT this project exported records its model.time_scale under `_ldm_time_scale` in config.json
  (diffusers' timestep is t * scale), and its class table as the DiT adds it (through vector_embedder).
- learned sigma: 2C output channels (model.learn_sigma=true), the variance half dropped.
- diffusers keeps a copy of the timestep and class embedders in every block: block 0's is used, and
  the others must equal it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
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
    tensor_shapes,
)

Tensor = torch.Tensor
PUBLISHED, DIFFUSERS = "published DiT format", "diffusers DiTTransformer2DModel format"
POS_EMBED_LAYOUT = "col_sin_cos"
SUFFIXES = (".weight", ".bias")

# module paths outside the blocks: (published, diffusers, this project's DiT)
OUTER = [
    ("x_embedder.proj", "pos_embed.proj", "patch_embed"),
    ("t_embedder.mlp.0", "transformer_blocks.0.norm1.emb.timestep_embedder.linear_1", "t_embedder.mlp.0"),
    ("t_embedder.mlp.2", "transformer_blocks.0.norm1.emb.timestep_embedder.linear_2", "t_embedder.mlp.2"),
    ("final_layer.adaLN_modulation.1", "proj_out_1", "final_layer.adaLN_modulation.proj"),
    ("final_layer.linear", "proj_out_2", "final_layer.linear"),
]
# module paths inside each block. The published qkv rows are [q | k | v], each head-major: to_qkv's layout;
# diffusers keeps attn1.to_q, to_k and to_v apart (None here): they are stacked and split by hand
INNER = [
    ("adaLN_modulation.1", "norm1.linear", "adaLN_modulation.proj"),
    ("attn.qkv", None, "attn.to_qkv"),
    ("attn.proj", "attn1.to_out.0", "attn.to_out"),
    ("mlp.fc1", "ff.net.0.proj", "mlp.net.0.0"),
    ("mlp.fc2", "ff.net.2", "mlp.net.2"),
]
PUBLISHED_CLASSES = "y_embedder.embedding_table.weight"
EMBEDDERS = "transformer_blocks.{}.norm1.emb."  # diffusers' per-block timestep and class embedders
DIFFUSERS_CLASSES = EMBEDDERS.format(0) + "class_embedder.embedding_table.weight"
# per format: its patch embedding, its output projection, its class table, and the time sinusoids'
# model.time_frequency_shift values that give its reference outputs (the published code's 0; diffusers'
# DiTTransformer2DModel's 1, which it also computes on the published weights it converts)
# the time convention of a DiT this project exported, as for a UNet (diffusers skips keys starting with "_")
TIME_SCALE_KEY = "_ldm_time_scale"
FORMATS = {PUBLISHED: ("x_embedder.proj.weight", "final_layer.linear.weight", PUBLISHED_CLASSES, (0, 1)),
           DIFFUSERS: ("pos_embed.proj.weight", "proj_out_2.weight", DIFFUSERS_CLASSES, (1,))}


@dataclass
class DiTWeights:
    """A DiT file in this project's names."""

    source: Path
    form: str
    tensors: dict[str, Tensor]     # the DiT's state dict
    depth: int
    class_table: Tensor | None     # (num_classes + 1, hidden), the null class last
    pos_embed: Tensor | None       # the published file's fixed (1, tokens, hidden) embedding
    config: dict | None            # diffusers' config.json


def count_blocks(state: dict, prefix: str) -> int:
    indices = {int(key[len(prefix):].split(".")[0]) for key in state if key.startswith(prefix)}
    return max(indices) + 1 if indices else 0


def renamed(state: dict, pairs: list[tuple[str, str]], used: set) -> dict[str, Tensor]:
    """The weight and bias of each (source, target) module path, under the target's name."""
    out = {}
    for source, target in pairs:
        for suffix in SUFFIXES:
            if source + suffix in state:
                out[target + suffix] = state[source + suffix]
                used.add(source + suffix)
    return out


def refuse_leftovers(state: dict, used: set, source: Path, form: str) -> None:
    leftover = sorted(set(state) - used)
    if leftover:
        raise WeightsError(f"{source} ({form}) holds {len(leftover)} weights that a DiT of this project has no "
                           f"place for (first: {', '.join(leftover[:3])})")


def from_published(state: dict, source: Path) -> DiTWeights:
    depth, used = count_blocks(state, "blocks."), {"pos_embed", PUBLISHED_CLASSES}
    pairs = [(published, ours) for published, _, ours in OUTER]
    pairs += [(f"blocks.{i}.{published}", f"blocks.{i}.{ours}") for i in range(depth) for published, _, ours in INNER]
    tensors = renamed(state, pairs, used)
    refuse_leftovers(state, used, source, PUBLISHED)
    return DiTWeights(source, PUBLISHED, tensors, depth, state.get(PUBLISHED_CLASSES), state.get("pos_embed"), None)


def check_embedder_copies(state: dict, depth: int, source: Path) -> set:
    """The keys of every block's embedders, once each copy is found equal to block 0's."""
    first = {key[len(EMBEDDERS.format(0)):]: value for key, value in state.items()
             if key.startswith(EMBEDDERS.format(0))}
    for i in range(1, depth):
        for name, value in first.items():
            key = EMBEDDERS.format(i) + name
            if key not in state or not torch.equal(state[key], value):
                raise WeightsError(
                    f"{source}: {key} differs from block 0's copy; this project's DiT has one timestep and class "
                    "embedder for all blocks, so it can load only a file whose blocks hold equal copies")
    return {key for key in state if key.startswith("transformer_blocks.") and ".norm1.emb." in key}


def from_diffusers(state: dict, source: Path, config: dict | None) -> DiTWeights:
    depth = count_blocks(state, "transformer_blocks.")
    used = check_embedder_copies(state, depth, source)
    pairs = [(theirs, ours) for _, theirs, ours in OUTER]
    pairs += [(f"transformer_blocks.{i}.{theirs}", f"blocks.{i}.{ours}")
              for i in range(depth) for _, theirs, ours in INNER if theirs]
    tensors = renamed(state, pairs, used)
    for i in range(depth):
        for suffix in SUFFIXES:
            parts = [f"transformer_blocks.{i}.attn1.to_{name}{suffix}" for name in "qkv"]
            if all(part in state for part in parts):
                tensors[f"blocks.{i}.attn.to_qkv{suffix}"] = torch.cat([state[part] for part in parts])
                used.update(parts)
    refuse_leftovers(state, used, source, DIFFUSERS)
    return DiTWeights(source, DIFFUSERS, tensors, depth, state.get(DIFFUSERS_CLASSES), None, config)


def file_format(names, file: Path) -> str:
    """PUBLISHED or DIFFUSERS, told from a DiT file's tensor names."""
    for form, (patch_embed, *_) in FORMATS.items():
        if patch_embed in names:
            return form
    raise WeightsError(f"{file} is not a DiT checkpoint: it has neither x_embedder.proj.weight (the published "
                       f"format) nor pos_embed.proj.weight (diffusers' DiTTransformer2DModel); its first keys are "
                       f"{', '.join(sorted(names)[:3])}")


def read_dit(path: str | Path) -> DiTWeights:
    """A DiT file in either format: a published `.pt`, or a diffusers model or pipeline directory or file."""
    file, config = find_weights(path, subfolder="transformer")
    state = read_state_dict(file)
    if file_format(state, file) == PUBLISHED:
        return from_published(state, file)
    return from_diffusers(state, file, config)


def conventions(path: str | Path) -> Conventions:
    """What a DiT file fixes beyond its shapes (read from its header): time input, time sinusoids, position
    embedding, the variance half of its output, and its class table."""
    file, config = find_weights(path, subfolder="transformer")
    shapes = tensor_shapes(file)
    form = file_format(shapes, file)
    patch_embed, output, classes, shifts = FORMATS[form]
    _, in_channels, patch = shapes[patch_embed][:3]
    scale = trained_time_scale(config)
    time = LEVEL_TIME if scale == 1 else {"model.time_scale": (scale,), "schedule.time_input": ("unit", ABSENT)}
    settings = {"model.pos_embed_layout": (POS_EMBED_LAYOUT,), "model.time_frequency_shift": shifts, **time}
    out_channels = shapes[output][0] // patch ** 2
    if out_channels in (in_channels, 2 * in_channels):  # other counts: the load names model.out_channels
        settings["model.learn_sigma"] = (out_channels == 2 * in_channels,)
    table = shapes.get(classes)
    trained_on = ("the integer DDPM level k" if scale == 1
                  else f"t * {scale:g} for t in [0, 1] (exported by this project)")
    description = f"a DiT in the {form}, trained on {trained_on}"
    if table is not None:
        description += f", with a class table of {table[0] - 1} classes and the null class"
    return Conventions(description, settings, tuple(table) if table is not None else None)


def trained_time_scale(config: dict | None) -> float | int:
    """The model.time_scale the file's DiT was trained with: 1 (the level k) unless this project exported it."""
    return (config or {}).get(TIME_SCALE_KEY, 1)


def read_class_table(path: str | Path) -> Tensor:
    """The (num_classes + 1, hidden) class embedding table of a DiT file, the null class last."""
    weights = read_dit(path)
    if weights.class_table is None:
        raise WeightsError(f"{weights.source} has no class embedding table: it is not a class-conditional DiT")
    return weights.class_table


def architecture_problems(model: nn.Module, weights: DiTWeights) -> list[str]:
    """What to set so the configured DiT has the file's shapes, one line each."""
    own, theirs, problems = model.state_dict(), weights.tensors, []

    def want(key: str, file_value, config_value, why: str = "") -> None:
        if file_value != config_value:
            problems.append(f"set {key}={file_value} (the config has {config_value}{why})")

    width, in_channels, patch = theirs["patch_embed.weight"].shape[:3]
    hidden = own["patch_embed.weight"].shape[0]
    want("model.hidden_size", width, hidden)
    want("model.patch_size", patch, model.patch_size)
    want("model.in_channels", in_channels, model.in_channels + model.concat_channels,
         ", concat_channels included" if model.concat_channels else "")
    want("model.depth", weights.depth, len(model.blocks))
    if "blocks.0.mlp.net.0.0.weight" in theirs and width == hidden:
        want("model.mlp_ratio", theirs["blocks.0.mlp.net.0.0.weight"].shape[0] / width,
             own["blocks.0.mlp.net.0.0.weight"].shape[0] / hidden)
    if weights.config and "num_attention_heads" in weights.config:
        want("model.num_heads", weights.config["num_attention_heads"], model.blocks[0].attn.num_heads)
    if patch == model.patch_size:
        file_out = theirs["final_layer.linear.weight"].shape[0] // patch ** 2
        ours = model.out_channels
        if file_out == 2 * ours and not model.learn_sigma:
            problems.append(f"set model.learn_sigma=true (the file predicts {file_out} channels, epsilon and "
                            f"variance, for {ours} latent channels)")
        elif file_out == ours and model.learn_sigma:
            problems.append(f"set model.learn_sigma=false (the file predicts {file_out} channels, no variance half)")
        elif file_out not in (ours, 2 * ours):
            problems.append(f"set model.out_channels={file_out}, or {file_out // 2} with model.learn_sigma=true "
                            f"(the file predicts {file_out} channels)")
    want("model.pos_embed_layout", POS_EMBED_LAYOUT, model.pos_embed_layout, ": the position embedding DiT adds")
    scale = trained_time_scale(weights.config)
    want("model.time_scale", scale, model.t_embedder.time_scale, "; with schedule.time_input=level: the network was "
         "trained on the integer DDPM level k" if scale == 1 else ": the network was exported with this time scale")
    shifts = FORMATS[weights.form][3]
    if model.t_embedder.frequency_shift not in shifts:
        want("model.time_frequency_shift", shifts[0], model.t_embedder.frequency_shift, f": the {weights.form}'s "
             "time sinusoids")
    if any(".cross_attn." in key for key in own):
        problems.append("set model.context_dim=null (the file has no cross-attention; conditioner=imagenet)")
    if any(key.startswith("vector_embedder.") for key in own):
        problems.append(f"set conditioner.vector_dim={width} (the file adds its class embedding to the time "
                        "embedding as it is; conditioner=imagenet)")
    elif model.vector_embedder is None and weights.class_table is not None:
        problems.append(f"use conditioner=imagenet (the file is class-conditional, with "
                        f"{weights.class_table.shape[0] - 1} classes and the null class)")
    return problems


def check_pos_embed(weights: DiTWeights, computed: Tensor) -> None:
    """The published file stores its position embedding: it must be the fixed one the model computes."""
    if weights.pos_embed is None:
        return
    tokens, width = weights.pos_embed.shape[-2:]
    same_grid = tuple(computed.shape[-2:]) == (tokens, width)
    error = (weights.pos_embed.reshape(tokens, width).float() - computed.reshape(tokens, width)).abs().max() \
        if same_grid else None
    if error is None or error > 1e-4:
        raise WeightsError(f"{weights.source}: pos_embed is not the fixed 2-D sin-cos embedding of a square grid "
                           f"(largest difference {error}); this project's DiT cannot hold a learned one")


def load_dit(model: nn.Module, path: str | Path) -> None:
    """Load a DiT file into `model` (an ldm.models.dit.DiT), naming the config keys to set when shapes differ."""
    weights = read_dit(path)
    problems = architecture_problems(model, weights)
    if problems:
        raise WeightsError([f"model.weights={path} ({weights.form}) does not fit the configured DiT: {line}"
                            for line in problems])
    check_pos_embed(weights, model.pos_embed.float())
    load_mapped(model, weights.tensors, weights.source)


# ---- writing a diffusers directory ---------------------------------------------------------------

def export_problems(dit: nn.Module, class_embedder) -> list[str]:
    """What diffusers' DiTTransformer2DModel cannot compute as this DiT does."""
    own, problems = dit.state_dict(), []
    hidden = own["patch_embed.weight"].shape[0]
    if dit.input_size[0] != dit.input_size[1]:
        problems.append(f"latents must be square, not {dit.input_size[0]}x{dit.input_size[1]} (model.input_size)")
    if dit.concat_channels:
        problems.append("set model.concat_channels=0 (it has no concatenated input)")
    if any(".cross_attn." in key for key in own):
        problems.append("set model.context_dim=null (it has no cross-attention)")
    if class_embedder is None or dit.vector_embedder is None:
        problems.append("its condition is a class table added to the time embedding: the run needs a "
                        "conditioner whose only vector is a class table (conditioner=class or imagenet)")
    elif class_embedder.embedding.weight.shape[1] != vector_width(dit, hidden):
        problems.append(f"the class embedder has width {class_embedder.embedding.weight.shape[1]}, the DiT takes "
                        f"vectors of width {vector_width(dit, hidden)}")
    if own["blocks.0.mlp.net.0.0.weight"].shape[0] != 4 * hidden:
        problems.append("set model.mlp_ratio=4 (its feed-forward width is 4x)")
    if dit.pos_embed_layout != POS_EMBED_LAYOUT:
        problems.append(f"set model.pos_embed_layout={POS_EMBED_LAYOUT} (its position embedding) and train anew")
    if dit.t_embedder.frequency_shift != 1:
        problems.append("set model.time_frequency_shift=1 and train anew (its time sinusoids are 10000^(-i/127); "
                        "no timestep it is given turns them into this DiT's)")
    if dit.t_embedder.frequency_dim != 256:
        problems.append("its time embedding has 256 sinusoids")
    return problems


def vector_width(dit: nn.Module, hidden: int) -> int:
    """The width of the vectors the DiT takes: its projection's input, or its own width when added as they are."""
    projection = dit.vector_embedder
    return projection.in_features if isinstance(projection, nn.Linear) else hidden


@torch.no_grad()
def folded_class_table(dit: nn.Module, class_embedder) -> Tensor:
    """The class table as the DiT adds it to the time embedding: each row through the DiT's vector projection
    (a function of the label alone, so diffusers' table holds it exactly)."""
    return dit.vector_embedder(class_embedder.embedding.weight.float())


def layer_map(dit: nn.Module) -> dict[str, list[str]]:
    """Project layer name -> its diffusers module paths, for adapters (to_qkv's parts stack by rows). The time
    embedder is left out: diffusers keeps a copy of it in every block."""
    out = {ours: [theirs] for _, theirs, ours in OUTER if not ours.startswith("t_embedder")}
    for i in range(len(dit.blocks)):
        for _, theirs, ours in INNER:
            out[f"blocks.{i}.{ours}"] = ([f"transformer_blocks.{i}.{theirs}"] if theirs else
                                         [f"transformer_blocks.{i}.attn1.to_{part}" for part in "qkv"])
    return out


def diffusers_state(own: dict[str, Tensor], class_table: Tensor, depth: int) -> dict[str, Tensor]:
    """This project's DiT state dict (and class table) in diffusers' names, each block with its embedder copy."""
    pairs = [(ours, theirs) for _, theirs, ours in OUTER]
    pairs += [(f"blocks.{i}.{ours}", f"transformer_blocks.{i}.{theirs}")
              for i in range(depth) for _, theirs, ours in INNER if theirs]
    out = renamed(own, pairs, set())
    out[DIFFUSERS_CLASSES] = class_table
    for i in range(depth):
        for suffix in SUFFIXES:
            for name, part in zip("qkv", own[f"blocks.{i}.attn.to_qkv{suffix}"].chunk(3), strict=True):
                out[f"transformer_blocks.{i}.attn1.to_{name}{suffix}"] = part
    first = {key[len(EMBEDDERS.format(0)):]: value for key, value in out.items() if key.startswith(EMBEDDERS.format(0))}
    for i in range(1, depth):
        out.update({EMBEDDERS.format(i) + name: value for name, value in first.items()})
    # safetensors stores no shared or strided tensors
    return {key: value.detach().float().cpu().contiguous().clone() for key, value in out.items()}


def to_diffusers(dit: nn.Module, class_embedder, directory: str | Path, notes: dict | None = None) -> Path:
    """Write `dit` and its `class_embedder` (a ClassEmbedder) as a diffusers DiTTransformer2DModel directory.

    The diffusers model takes `t * model.time_scale` as its timestep (t: the time this DiT is given);
    config.json records the scale under `_ldm_time_scale`, and `notes` (more `_ldm_*` keys): diffusers
    ignores config keys that start with "_".
    """
    problems = export_problems(dit, class_embedder)
    if problems:
        raise WeightsError([f"to_diffusers: diffusers' DiTTransformer2DModel cannot reproduce this DiT: {line}"
                            for line in problems])
    own, depth = dit.state_dict(), len(dit.blocks)
    hidden, heads = own["patch_embed.weight"].shape[0], dit.blocks[0].attn.num_heads
    config = {
        "_class_name": "DiTTransformer2DModel", "num_attention_heads": heads, "attention_head_dim": hidden // heads,
        "in_channels": dit.in_channels, "out_channels": dit.out_channels * (2 if dit.learn_sigma else 1),
        "num_layers": depth, "dropout": 0.0, "norm_num_groups": 32, "attention_bias": True,
        "sample_size": dit.input_size[0], "patch_size": dit.patch_size, "activation_fn": "gelu-approximate",
        "num_embeds_ada_norm": class_embedder.num_classes, "upcast_attention": False, "norm_type": "ada_norm_zero",
        "norm_elementwise_affine": False, "norm_eps": 1e-6,  # this project's layer norms
        TIME_SCALE_KEY: float(dit.t_embedder.time_scale), **(notes or {}),
    }
    directory = Path(directory)
    with atomic_write(directory / "diffusion_pytorch_model.safetensors") as handle:
        handle.write(save(diffusers_state(own, folded_class_table(dit, class_embedder), depth)))
    with atomic_write(directory / "config.json") as handle:
        handle.write(json.dumps(config, indent=2).encode())
    return directory
