"""Stable Diffusion UNets (SD-1.x and SD-2.x layouts) loaded through model.weights match diffusers' outputs."""

from __future__ import annotations

import gc
import re

import hydra
import pytest
import torch
from conftest import compose_config
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
from safetensors.torch import save_file

from ldm.contracts.conditioning import Conditioning
from ldm.weights.files import WeightsError
from ldm.weights.unet import to_diffusers

LEVELS = [0, 1, 500, 999]  # integer DDPM levels, as the SD networks take them
TOKENS, CONTEXT, SIZE = 8, 32, 16
TOLERANCE = 1e-4

# small SD-1-like (1x1 conv projections, `attention_head_dim` = number of heads) and SD-2-like (linear
# projections, 16-channel heads) diffusers configs, and the project overrides that describe them
SD1 = dict(block_out_channels=(32, 64, 64), layers_per_block=2, cross_attention_dim=CONTEXT, attention_head_dim=2,
           down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
           up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), sample_size=SIZE)
SD2 = dict(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=CONTEXT, attention_head_dim=[2, 4],
           down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
           up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), use_linear_projection=True,
           transformer_layers_per_block=2, sample_size=SIZE)
OURS = {
    "sd1": ["model=unet_sd", "model.channels=32", "model.channel_mult=[1,2,2]", "model.num_res_blocks=2",
            "model.attention_resolutions=[1,2]", "model.num_heads=2"],
    "sd2": ["model=unet_sd2", "model.channels=32", "model.channel_mult=[1,2]", "model.num_res_blocks=1",
            "model.attention_resolutions=[1,2]", "model.num_head_channels=16", "model.transformer_depth=2",
            f"model.context_dim={CONTEXT}"],
    # the default ADM-style UNet: scale-shift norms, no attention at full resolution, t in [0, 1] times 1000
    "adm": ["model=unet", "model.channels=32", "model.channel_mult=[1,2,2]", "model.num_res_blocks=2",
            "model.attention_resolutions=[2,4]", "model.num_heads=2"],
}
SIZES = ["data.image_size=64", "autoencoder.downsample=4", "autoencoder.latent_channels=4",
         "conditioner.vector_dim=null", f"conditioner.context_dim={CONTEXT}"]

# original (CompVis / Stability) names of a diffusers resnet's layers
RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
          "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


pytestmark = pytest.mark.usefixtures("one_thread")


def reference(config: dict, seed: int = 0) -> UNet2DConditionModel:
    """A diffusers UNet with every weight moved off its initial value (no zero or unit layers left)."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**config).eval()
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for parameter in unet.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    return unet


def original_name(key: str, config: dict) -> str:
    """The original SD checkpoint name of a diffusers UNet key, by the published numbering of blocks."""
    per_down, per_up = config["layers_per_block"] + 1, config["layers_per_block"] + 1
    rules = [
        (r"conv_in\.(.*)", lambda m: f"input_blocks.0.0.{m[1]}"),
        (r"time_embedding\.linear_(\d)\.(.*)", lambda m: f"time_embed.{2 * int(m[1]) - 2}.{m[2]}"),
        (r"conv_norm_out\.(.*)", lambda m: f"out.0.{m[1]}"),
        (r"conv_out\.(.*)", lambda m: f"out.2.{m[1]}"),
        (r"down_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(.*)",
         lambda m: f"input_blocks.{1 + int(m[1]) * per_down + int(m[2])}.0.{RESNET[m[3]]}.{m[4]}"),
        (r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.*)",
         lambda m: f"input_blocks.{1 + int(m[1]) * per_down + int(m[2])}.1.{m[3]}"),
        (r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)",
         lambda m: f"input_blocks.{(int(m[1]) + 1) * per_down}.0.op.{m[2]}"),
        (r"mid_block\.resnets\.(\d)\.(\w+)\.(.*)", lambda m: f"middle_block.{2 * int(m[1])}.{RESNET[m[2]]}.{m[3]}"),
        (r"mid_block\.attentions\.0\.(.*)", lambda m: f"middle_block.1.{m[1]}"),
        (r"up_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(.*)",
         lambda m: f"output_blocks.{int(m[1]) * per_up + int(m[2])}.0.{RESNET[m[3]]}.{m[4]}"),
        (r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.*)",
         lambda m: f"output_blocks.{int(m[1]) * per_up + int(m[2])}.1.{m[3]}"),
        (r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)",
         lambda m: f"output_blocks.{int(m[1]) * per_up + per_up - 1}."
                   f"{2 if config['up_block_types'][int(m[1])].startswith('CrossAttn') else 1}.conv.{m[2]}"),
    ]
    for pattern, rename in rules:
        match = re.fullmatch(pattern, key)
        if match:
            return rename(match)
    raise AssertionError(f"no original name for {key}")


def original_checkpoint(unet: UNet2DConditionModel, prefix: str = "model.diffusion_model.") -> dict:
    """The diffusers weights under original SD names, checked against diffusers' own converter."""
    state = {prefix + original_name(key, unet.config): value.contiguous() for key, value in unet.state_dict().items()}
    back = convert_ldm_unet_checkpoint({"model.diffusion_model." + key[len(prefix):]: value
                                        for key, value in state.items()}, dict(unet.config))
    assert back.keys() == unet.state_dict().keys()
    assert all(torch.equal(back[key], value) for key, value in unet.state_dict().items())
    return state


def build(preset: str, weights=None, extra=()):
    overrides = OURS[preset] + SIZES + list(extra) + ([f"model.weights={weights}"] if weights is not None else [])
    return hydra.utils.instantiate(compose_config(overrides).model).eval()


def inputs(batch: int = len(LEVELS), channels: int = 4, size: int = SIZE, tokens: int = TOKENS, width: int = CONTEXT):
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(batch, channels, size, size, generator=generator)
    context = torch.randn(batch, tokens, width, generator=generator)
    return x, torch.tensor(LEVELS[:batch]), context


def relative_difference(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return ((ours - theirs).abs().max() / theirs.abs().max()).item()


@torch.no_grad()
def compare(model, unet: UNet2DConditionModel, time_scale: float = 1.0, **sizes) -> float:
    x, levels, context = inputs(**sizes)
    theirs = unet(x, levels * time_scale, encoder_hidden_states=context).sample
    ours = model(x, levels.float(), Conditioning(tokens=context))
    assert not torch.equal(ours[0], ours[-1])  # the levels reach the network
    return relative_difference(ours, theirs)


@pytest.fixture(scope="module")
def references():
    return {"sd1": reference(SD1), "sd2": reference(SD2, seed=3)}


@pytest.mark.parametrize("preset", ["sd1", "sd2"])
@pytest.mark.parametrize("source", ["diffusers", "pipeline", "original", "bare_ckpt"])
def test_loaded_unet_matches_diffusers(references, preset, source, tmp_path):
    unet = references[preset]
    if source == "diffusers":
        unet.save_pretrained(tmp_path / "unet")
        weights = tmp_path / "unet"
    elif source == "pipeline":  # a pipeline directory: the UNet in its unet/ subfolder
        unet.save_pretrained(tmp_path / "sd" / "unet")
        weights = tmp_path / "sd"
    elif source == "original":  # a whole SD checkpoint: other stages' weights sit beside the UNet's
        state = original_checkpoint(unet) | {"first_stage_model.decoder.conv_in.weight": torch.zeros(3)}
        weights = tmp_path / "v1-5-pruned.safetensors"
        save_file(state, weights)
    else:
        weights = tmp_path / "unet.ckpt"
        torch.save({"state_dict": original_checkpoint(unet, prefix="")}, weights)
    difference = compare(build(preset, weights), unet)
    print(f"{preset} from {source}: largest relative difference to diffusers {difference:.2e}")
    assert difference <= TOLERANCE


@pytest.mark.parametrize("preset, time_scale", [("sd1", 1.0), ("sd2", 1.0), ("adm", 1000.0)])
@torch.no_grad()
def test_export_loads_in_diffusers_with_the_same_output(preset, time_scale, tmp_path):
    model = build(preset)
    assert model.settings["time_scale"] == time_scale
    generator = torch.Generator().manual_seed(5)
    for parameter in model.parameters():
        parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    to_diffusers(model, tmp_path / "exported")
    unet = UNet2DConditionModel.from_pretrained(tmp_path / "exported").eval()
    x, levels, context = inputs()
    t = levels.float() / time_scale
    difference = relative_difference(model(x, t, Conditioning(tokens=context)),
                                     unet(x, t * time_scale, encoder_hidden_states=context).sample)
    print(f"export of {preset}: largest relative difference to diffusers {difference:.2e}")
    assert difference <= TOLERANCE
    # and it loads back into the project's UNet
    assert compare(build(preset, tmp_path / "exported"), unet, time_scale) <= TOLERANCE


def build_error(preset: str, weights, extra=()) -> str:
    """The WeightsError that building the model raises (Hydra wraps it), as text."""
    with pytest.raises(Exception) as raised:  # noqa: PT011 - the cause is checked below
        build(preset, weights, extra)
    assert isinstance(raised.value.__cause__, WeightsError), raised.value
    return str(raised.value.__cause__)


def test_mismatched_config_names_the_key_to_set(references, tmp_path):
    references["sd2"].save_pretrained(tmp_path / "sd2")
    sd2_widths = ["model.channel_mult=[1,2]", "model.num_res_blocks=1", "model.transformer_depth=2"]
    message = build_error("sd1", tmp_path / "sd2", extra=sd2_widths)
    assert "set model.use_linear_projection=true" in message and "set model.num_head_channels=16" in message
    message = build_error("sd2", tmp_path / "sd2", extra=["model.channel_mult=[1,2,2]"])
    assert "block_out_channels=[32, 64]: set model.channels=32 model.channel_mult=[1, 2]" in message
    # an original checkpoint has no config: the weight shapes tell
    save_file(original_checkpoint(references["sd2"]), tmp_path / "sd2.safetensors")
    assert "set model.use_linear_projection=true" in build_error("sd1", tmp_path / "sd2.safetensors", sd2_widths)
    assert "set model.context_dim=32" in build_error("sd2", tmp_path / "sd2.safetensors", ["model.context_dim=64"])
    # the file cannot say its time input: Stable Diffusion's (no time scale exported) is the level k
    assert "set model.time_scale=1 with schedule.time_input=level" in build_error(
        "sd2", tmp_path / "sd2", ["model.time_scale=1000"])


def test_missing_weights_name_the_file_to_provide(tmp_path):
    missing = tmp_path / "sd15"
    message = build_error("sd1", missing)
    assert f"model.weights={missing}: weights {missing} do not exist" in message
    assert "v1-5-pruned.safetensors" in message
    missing.mkdir()
    assert "diffusion_pytorch_model.safetensors" in build_error("sd1", missing)


@pytest.mark.parametrize("preset, context, published", [("unet_sd", 768, "sd15"), ("unet_sd2", 1024, "sd21")])
def test_presets_have_the_parameters_of_the_published_unets(preset, context, published):
    down = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    sd15 = dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768,
                attention_head_dim=8, down_block_types=down, up_block_types=tuple(k.replace("Down", "Up")
                                                                                   for k in reversed(down)))
    configs = {"sd15": sd15, "sd21": sd15 | dict(cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20],
                                                 use_linear_projection=True)}
    with torch.device("meta"):
        theirs = UNet2DConditionModel(**configs[published])
        ours = hydra.utils.instantiate(compose_config([
            f"model={preset}", "data.image_size=512", "autoencoder.downsample=8", "autoencoder.latent_channels=4",
            "conditioner.vector_dim=null", f"conditioner.context_dim={context}"]).model)
    count = sum(parameter.numel() for parameter in ours.parameters())
    assert count == sum(parameter.numel() for parameter in theirs.parameters())
    print(f"{preset}: {count:,} parameters, as diffusers' {published}")


@pytest.mark.slow
@torch.no_grad()
def test_full_size_sd15_matches_diffusers(tmp_path):
    torch.set_num_threads(2)
    down = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    config = dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768,
                  attention_head_dim=8, down_block_types=down, sample_size=64,
                  up_block_types=tuple(kind.replace("Down", "Up") for kind in reversed(down)))
    unet = reference(config)
    x, levels, context = inputs(batch=1, size=64, tokens=77, width=768)
    theirs = unet(x, levels, encoder_hidden_states=context).sample
    save_file(original_checkpoint(unet), tmp_path / "v1-5-pruned.safetensors")
    del unet
    gc.collect()
    model = hydra.utils.instantiate(compose_config([
        "model=unet_sd", "data.image_size=512", "autoencoder.downsample=8", "autoencoder.latent_channels=4",
        "conditioner.vector_dim=null", "conditioner.context_dim=768",
        f"model.weights={tmp_path / 'v1-5-pruned.safetensors'}"]).model).eval()
    difference = relative_difference(model(x, levels.float(), Conditioning(tokens=context)), theirs)
    print(f"full-size SD-1.5: largest relative difference to diffusers {difference:.2e}")
    assert difference <= TOLERANCE
