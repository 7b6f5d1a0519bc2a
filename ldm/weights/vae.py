"""Published KL-VAE weights <-> `SDAutoencoder`: key maps, layout detection, checks, and export to diffusers.

Layouts read (detected from the keys): diffusers' `AutoencoderKL` (a directory with config.json, a
pipeline directory with `vae/`, or one file), and the original LDM / SD layout (`encoder.down.0.block.0`,
`encoder.mid.attn_1.q` as 1x1 convs, ...) bare as in `vae-ft-mse-840000-ema-pruned` or Flux's `ae`, or
under `first_stage_model.` in a full checkpoint.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import save

from ldm.utils.files import atomic_write
from ldm.weights.files import WeightsError, find_weights, load_mapped, read_state_dict, with_prefix

# project name fragment <-> other layout's fragment, applied in order; "#" stands for an index
DIFFUSERS_NAMES = [
    (".down.#.res.#.", ".down_blocks.#.resnets.#."),
    (".down.#.downsample.", ".down_blocks.#.downsamplers.0.conv."),
    (".up.#.res.#.", ".up_blocks.#.resnets.#."),  # diffusers counts up blocks from the lowest resolution
    (".up.#.upsample.", ".up_blocks.#.upsamplers.0.conv."),
    (".mid.res1.", ".mid_block.resnets.0."),
    (".mid.res2.", ".mid_block.resnets.1."),
    (".mid.attn.norm.", ".mid_block.attentions.0.group_norm."),
    (".mid.attn.q.", ".mid_block.attentions.0.to_q."),
    (".mid.attn.k.", ".mid_block.attentions.0.to_k."),
    (".mid.attn.v.", ".mid_block.attentions.0.to_v."),
    (".mid.attn.out.", ".mid_block.attentions.0.to_out.0."),
    (".skip.", ".conv_shortcut."),
    (".norm_out.", ".conv_norm_out."),
]
# names of diffusers files written before its attention layers were renamed (read only)
OLD_DIFFUSERS_NAMES = [(".to_q.", ".query."), (".to_k.", ".key."), (".to_v.", ".value."), (".to_out.0.", ".proj_attn.")]
ORIGINAL_NAMES = [
    (".down.#.res.#.", ".down.#.block.#."),
    (".up.#.res.#.", ".up.#.block.#."),
    (".down.#.downsample.", ".down.#.downsample.conv."),
    (".up.#.upsample.", ".up.#.upsample.conv."),
    (".mid.res1.", ".mid.block_1."),
    (".mid.res2.", ".mid.block_2."),
    (".mid.attn.out.", ".mid.attn_1.proj_out."),
    (".mid.attn.", ".mid.attn_1."),
    (".skip.", ".nin_shortcut."),
]
CHECKPOINT_PREFIXES = ("first_stage_model.", "vae.")  # where full checkpoints keep their VAE
TRAINING_ONLY = ("loss.",)  # the original training checkpoints' discriminator and perceptual-loss weights
ATTENTION_WEIGHT = re.compile(r"\.mid\.attn\.(q|k|v|out)\.weight$")
UP_LEVEL = re.compile(r"^decoder\.up\.(\d+)\.")
DIFFUSERS_DEFAULTS = dict(in_channels=3, out_channels=3, block_out_channels=[64], layers_per_block=1,
                          latent_channels=4, norm_num_groups=32, act_fn="silu", use_quant_conv=True,
                          use_post_quant_conv=True, mid_block_add_attention=True)


def _rule(source: str, target: str) -> tuple[re.Pattern, str]:
    pattern = re.compile(re.escape(source).replace(re.escape("#"), r"(\d+)"))
    pieces = target.split("#")
    replacement = "".join(piece + (rf"\g<{i + 1}>" if i < len(pieces) - 1 else "") for i, piece in enumerate(pieces))
    return pattern, replacement


def _renamed(state: dict, names: list[tuple[str, str]], forward: bool) -> dict:
    rules = [_rule(a, b) if forward else _rule(b, a) for a, b in names]
    renamed = {}
    for key, value in state.items():
        for pattern, replacement in rules:
            key = pattern.sub(replacement, key)
        renamed[key] = value
    return renamed


def _levels(state: dict, pattern: str) -> int:
    found = {int(m.group(1)) for key in state if (m := re.match(pattern, key))}
    return max(found) + 1 if found else 0


def _flip_up_levels(state: dict, levels: int) -> dict:
    """Renumber decoder levels l <-> levels - 1 - l (its own inverse)."""
    return {UP_LEVEL.sub(lambda m: f"decoder.up.{levels - 1 - int(m.group(1))}.", key): value
            for key, value in state.items()}


def from_diffusers(state: dict) -> dict:
    state = _renamed(_renamed(state, OLD_DIFFUSERS_NAMES, forward=False), DIFFUSERS_NAMES, forward=False)
    return _flip_up_levels(state, _levels(state, r"^encoder\.down\.(\d+)\."))


def to_diffusers_state(state: dict) -> dict:
    state = _flip_up_levels(state, _levels(state, r"^encoder\.down\.(\d+)\."))
    return _renamed(state, DIFFUSERS_NAMES, forward=True)


def from_original(state: dict) -> dict:
    state = {key: value for key, value in state.items() if not key.startswith(TRAINING_ONLY)}
    return _renamed(state, ORIGINAL_NAMES, forward=False)


def to_original_state(state: dict) -> dict:
    """The original layout (as in `vae-ft-mse-840000-ema-pruned`): attention projections as 1x1 convs."""
    state = {key: value[..., None, None] if ATTENTION_WEIGHT.search(key) else value for key, value in state.items()}
    return _renamed(state, ORIGINAL_NAMES, forward=True)


def detect_layout(state: dict) -> tuple[str, dict]:
    """("diffusers" | "original", the VAE's own entries), taken out of a full checkpoint if need be."""
    for prefix in CHECKPOINT_PREFIXES:
        if not any(key.startswith("encoder.") for key in state) and any(key.startswith(prefix) for key in state):
            state = with_prefix(state, prefix)
    if any(".down_blocks." in key or ".mid_block." in key for key in state):
        return "diffusers", state
    if any(".mid.block_1." in key or re.search(r"\.down\.\d+\.block\.", key) for key in state):
        return "original", state
    example = ", ".join(sorted(state)[:3])
    raise WeightsError(f"these weights are not a KL-VAE in a known layout (keys such as {example}): expected "
                       f"diffusers' AutoencoderKL keys (encoder.down_blocks.0...), the original ones "
                       f"(encoder.down.0.block.0...), or either under first_stage_model.")


def project_state(state: dict) -> dict:
    """A KL-VAE state dict of either layout under SDAutoencoder's names."""
    layout, state = detect_layout(state)
    state = from_diffusers(state) if layout == "diffusers" else from_original(state)
    # the original layout stores attention projections as 1x1 convs; here they are linear layers
    return {key: value.flatten(1) if ATTENTION_WEIGHT.search(key) and value.ndim == 4 else value
            for key, value in state.items()}


def architecture_of(state: dict) -> dict:
    """The architecture arguments a project-named state dict implies (those its keys tell)."""
    found = {}
    if "encoder.conv_in.weight" in state:
        found["channels"], found["in_channels"] = state["encoder.conv_in.weight"].shape[:2]
        levels = _levels(state, r"^encoder\.down\.(\d+)\.")
        widths = [state.get(f"encoder.down.{level}.res.0.conv1.weight") for level in range(levels)]
        if all(width is not None for width in widths):
            found["channel_mult"] = [int(width.shape[0]) // found["channels"] for width in widths]
        found["num_res_blocks"] = _levels(state, r"^encoder\.down\.0\.res\.(\d+)\.")
    if "decoder.conv_in.weight" in state:
        found["latent_channels"] = state["decoder.conv_in.weight"].shape[1]
    if "decoder.conv_out.weight" in state:
        found["out_channels"] = state["decoder.conv_out.weight"].shape[0]
    found["use_quant_conv"] = "quant_conv.weight" in state
    return found


def architecture_from_config(config: dict, source: Path) -> tuple[dict, list[str]]:
    """The architecture arguments of a diffusers AutoencoderKL config, and what in it this model cannot do."""
    config = {**DIFFUSERS_DEFAULTS, **config}
    problems = []
    if config.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        problems.append(f"{source} describes a {config['_class_name']}, not an AutoencoderKL")
    widths = list(config["block_out_channels"])
    unsupported = {
        "norm_num_groups": config["norm_num_groups"] != 32, "act_fn": config["act_fn"] != "silu",
        "mid_block_add_attention": not config["mid_block_add_attention"],
        "use_post_quant_conv": config["use_post_quant_conv"] != config["use_quant_conv"],
        "down_block_types": any(kind != "DownEncoderBlock2D" for kind in config.get("down_block_types", [])),
        "up_block_types": any(kind != "UpDecoderBlock2D" for kind in config.get("up_block_types", [])),
        "block_out_channels": any(width % widths[0] for width in widths)}
    problems += [f"{source}: {key}={config[key]!r} is not supported by autoencoder=sd_vae (it builds "
                 f"diffusers' default AutoencoderKL blocks)" for key, bad in unsupported.items() if bad]
    architecture = dict(in_channels=config["in_channels"], out_channels=config["out_channels"],
                        channels=widths[0], channel_mult=[width // widths[0] for width in widths],
                        num_res_blocks=config["layers_per_block"], latent_channels=config["latent_channels"],
                        use_quant_conv=bool(config["use_quant_conv"]))
    return architecture, problems


def _override(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ",".join(map(str, value)) + "]"
    return str(value)


def mismatches(found: dict, wanted: dict, source: Path | str) -> list[str]:
    """One line per argument where the weights' architecture differs from the configured one."""
    return [f"{source} has {key}={_override(value)}, the config {_override(wanted[key])}: set "
            f"autoencoder.{key}={_override(value)}" for key, value in found.items() if wanted.get(key) != value]


def constant_mismatches(config: dict, autoencoder, source: Path) -> list[str]:
    """The published latent constants of a diffusers config against the configured ones (None: measured)."""
    problems = []
    for ours, theirs in (("scale_factor", "scaling_factor"), ("shift_factor", "shift_factor")):
        configured, published = getattr(autoencoder, ours), config.get(theirs)
        if theirs == "shift_factor" and published is None:
            published = 0.0
        if configured is not None and published is not None and abs(float(configured) - published) > 1e-6:
            problems.append(f"{source} has {theirs}={published}, the config {configured}: set "
                            f"autoencoder.{ours}={published} (or null to measure it from the data)")
    return problems


def load_vae_weights(autoencoder, weights: str | Path) -> None:
    """Fill an SDAutoencoder from a diffusers directory or file, or an original single file or checkpoint."""
    path = Path(weights).expanduser()
    if not path.exists():
        raise WeightsError(f"autoencoder.weights={weights}: no such file or directory; provide the VAE as a "
                           f"diffusers directory (config.json + diffusion_pytorch_model.safetensors, or a pipeline "
                           f"directory with vae/) or a single .safetensors / .ckpt file")
    file, config = find_weights(path, subfolder="vae")
    wanted = autoencoder.architecture()
    problems = []
    if config is not None:
        found, problems = architecture_from_config(config, file.parent / "config.json")
        problems += mismatches(found, wanted, file.parent / "config.json")
        problems += constant_mismatches(config, autoencoder, file.parent / "config.json")
    if problems:
        raise WeightsError(problems)
    state = project_state(read_state_dict(file))
    problems = mismatches(architecture_of(state), wanted, file)
    if problems:
        raise WeightsError(problems)
    load_mapped(autoencoder, state, file)


def diffusers_config(autoencoder, scale_factor: float | None = None, shift_factor: float | None = None) -> dict:
    """The config.json of diffusers' AutoencoderKL for this architecture and latent constants."""
    levels = len(autoencoder.channel_mult)
    scale = scale_factor if scale_factor is not None else autoencoder.scale_factor
    shift = shift_factor if shift_factor is not None else autoencoder.shift_factor
    return {
        "_class_name": "AutoencoderKL", "act_fn": "silu", "in_channels": autoencoder.in_channels,
        "out_channels": autoencoder.out_channels, "latent_channels": autoencoder.latent_channels,
        "block_out_channels": [autoencoder.channels * m for m in autoencoder.channel_mult],
        "down_block_types": ["DownEncoderBlock2D"] * levels, "up_block_types": ["UpDecoderBlock2D"] * levels,
        "layers_per_block": autoencoder.num_res_blocks, "norm_num_groups": 32, "mid_block_add_attention": True,
        "use_quant_conv": autoencoder.use_quant_conv, "use_post_quant_conv": autoencoder.use_quant_conv,
        # diffusers tiles images larger than sample_size; 1.0 stands for "no scaling" when none is known
        "sample_size": autoencoder.tile_size or 512, "scaling_factor": 1.0 if scale is None else float(scale),
        "shift_factor": None if not shift else float(shift),
    }


def to_diffusers(autoencoder, directory: str | Path, scale_factor: float | None = None,
                 shift_factor: float | None = None) -> Path:
    """Write config.json + diffusion_pytorch_model.safetensors that diffusers.AutoencoderKL.from_pretrained reads.

    `scale_factor` / `shift_factor` (e.g. measured ones) replace the autoencoder's own constants."""
    directory = Path(directory)
    state = to_diffusers_state({key: value.detach().cpu().contiguous()
                                for key, value in autoencoder.state_dict().items()})
    with atomic_write(directory / "diffusion_pytorch_model.safetensors") as handle:
        handle.write(save(state))
    config = diffusers_config(autoencoder, scale_factor, shift_factor)
    with atomic_write(directory / "config.json") as handle:
        handle.write((json.dumps(config, indent=2) + "\n").encode())
    return directory


def original_state_dict(autoencoder) -> dict[str, torch.Tensor]:
    """The autoencoder's weights in the original LDM / SD single-file layout."""
    return to_original_state({key: value.detach().cpu() for key, value in autoencoder.state_dict().items()})
