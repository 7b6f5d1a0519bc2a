"""autoencoder=sd_vae against diffusers' AutoencoderKL with the same random weights, in every layout it reads."""

from __future__ import annotations

import json

import hydra
import pytest
import torch
import torch.nn.functional as F
from conftest import compose_config
from diffusers import AutoencoderKL
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
from hydra.errors import InstantiationException
from safetensors.torch import save_file
from torch.utils._python_dispatch import TorchDispatchMode

from ldm.autoencoders.sd_vae import SDAutoencoder
from ldm.autoencoders.tiling import tiled
from ldm.weights.files import WeightsError
from ldm.weights.vae import original_state_dict, to_diffusers

# small versions of the SD VAE (4 latent channels, quant convs) and of the SD3 / Flux one (16, none)
VARIANTS = {"sd": dict(preset="sd_vae", latent=4, quant=True, constants={}),
            "sd3": dict(preset="sd3_vae", latent=16, quant=False,
                        constants=dict(scaling_factor=1.5305, shift_factor=0.0609))}
SMALL = ["autoencoder.in_channels=3", "autoencoder.channels=32", "autoencoder.channel_mult=[1,2]",
         "autoencoder.downsample=2"]
LAYOUTS = ["diffusers_dir", "pipeline_dir", "diffusers_file", "original_file", "original_ckpt"]
TOLERANCE = 1e-4


def largest_relative_difference(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return float((ours - reference).abs().max() / reference.abs().max())


def reference_vae(latent: int = 4, quant: bool = True, blocks=(32, 64), **config) -> AutoencoderKL:
    """diffusers' AutoencoderKL with random weights; every tensor perturbed so no norm is (1, 0) and no bias 0."""
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=blocks, layers_per_block=2,
                        down_block_types=("DownEncoderBlock2D",) * len(blocks),
                        up_block_types=("UpDecoderBlock2D",) * len(blocks), latent_channels=latent,
                        use_quant_conv=quant, use_post_quant_conv=quant, **config)
    with torch.no_grad():
        for parameter in vae.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return vae.eval()


def original_key(key: str, levels: int) -> str:
    """diffusers' name of a VAE tensor -> the original LDM / SD single-file name (written out rule by rule)."""
    head, _, rest = key.partition(".")
    if head not in ("encoder", "decoder"):
        return key  # quant_conv, post_quant_conv
    rest = rest.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
    rest = rest.replace("mid_block.resnets.0.", "mid.block_1.").replace("mid_block.resnets.1.", "mid.block_2.")
    rest = rest.replace("mid_block.attentions.0.group_norm.", "mid.attn_1.norm.")
    for new, old in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0")):
        rest = rest.replace(f"mid_block.attentions.0.{old}.", f"mid.attn_1.{new}.")
    tokens = rest.split(".")
    if tokens[0] in ("down_blocks", "up_blocks"):
        # the original numbers decoder levels from full resolution, diffusers from the lowest
        level = int(tokens[1]) if tokens[0] == "down_blocks" else levels - 1 - int(tokens[1])
        stage = "down" if tokens[0] == "down_blocks" else "up"
        if tokens[2] == "resnets":
            tokens = [stage, str(level), "block", *tokens[3:]]
        else:  # down_blocks.i.downsamplers.0.conv.weight -> down.i.downsample.conv.weight
            tokens = [stage, str(level), "downsample" if stage == "down" else "upsample", *tokens[4:]]
    return ".".join([head, *tokens])


def original_layout(reference: AutoencoderKL) -> dict[str, torch.Tensor]:
    """The reference's weights as the original single file holds them: attention projections as 1x1 convs."""
    levels = len(reference.config.block_out_channels)
    state = {}
    for key, value in reference.state_dict().items():
        name = original_key(key, levels)
        is_attention = ".attn_1." in name and not name.split(".attn_1.")[1].startswith("norm") and value.ndim == 2
        state[name] = value[..., None, None] if is_attention else value
    return state


def save_layout(reference: AutoencoderKL, layout: str, tmp_path):
    """Write the reference's weights in `layout`; returns the path to give as autoencoder.weights."""
    if layout == "diffusers_dir":
        reference.save_pretrained(tmp_path / "vae")
        return tmp_path / "vae"
    if layout == "pipeline_dir":
        reference.save_pretrained(tmp_path / "pipeline" / "vae")
        (tmp_path / "pipeline" / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
        return tmp_path / "pipeline"
    if layout == "diffusers_file":
        save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, tmp_path / "vae.safetensors")
        return tmp_path / "vae.safetensors"
    original = original_layout(reference)
    if layout == "original_file":
        save_file({k: v.contiguous() for k, v in original.items()}, tmp_path / "vae-ft-mse.safetensors")
        return tmp_path / "vae-ft-mse.safetensors"
    # a full SD checkpoint: the VAE under first_stage_model., next to the denoiser and the text encoder
    checkpoint = {f"first_stage_model.{k}": v for k, v in original.items()}
    checkpoint["model.diffusion_model.input_blocks.0.0.weight"] = torch.randn(8, 4, 3, 3)
    checkpoint["cond_stage_model.transformer.text_model.final_layer_norm.weight"] = torch.randn(8)
    torch.save({"state_dict": checkpoint, "global_step": 470000}, tmp_path / "sd.ckpt")
    return tmp_path / "sd.ckpt"


def build(preset: str, weights, *overrides: str) -> SDAutoencoder:
    cfg = compose_config([f"autoencoder={preset}", f"autoencoder.weights={weights}", *SMALL, *overrides])
    try:
        return hydra.utils.instantiate(cfg.autoencoder).eval()
    except InstantiationException as error:
        raise error.__cause__ from None  # the autoencoder's own error


def compare(ours: SDAutoencoder, reference: AutoencoderKL, size: int = 32) -> tuple[float, float]:
    """Largest relative differences of the encoder's mean and of the decoder (unscaled) to the reference's."""
    generator = torch.Generator().manual_seed(1)
    images = torch.rand(2, 3, size, size, generator=generator) * 2 - 1
    latents = torch.randn(2, ours.latent_channels, size // ours.downsample, size // ours.downsample,
                          generator=generator)
    with torch.no_grad():
        encoded = largest_relative_difference(ours.encode(images, sample=False),
                                              reference.encode(images).latent_dist.mean)
        decoded = largest_relative_difference(ours.decode(latents), reference.decode(latents).sample)
    return encoded, decoded


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_encodes_and_decodes_as_diffusers(variant, layout, tmp_path):
    spec = VARIANTS[variant]
    reference = reference_vae(spec["latent"], spec["quant"], **spec["constants"])
    ours = build(spec["preset"], save_layout(reference, layout, tmp_path))
    encoded, decoded = compare(ours, reference)
    print(f"{variant} {layout}: encode mean {encoded:.2e}, decode {decoded:.2e}")
    assert encoded <= TOLERANCE and decoded <= TOLERANCE


def test_the_test_key_map_is_the_one_diffusers_converts():
    """The original layout written above is what diffusers' own single-file converter reads back."""
    reference = reference_vae()
    converted = convert_ldm_vae_checkpoint(original_layout(reference), dict(reference.config))
    expected = reference.state_dict()
    assert set(converted) == set(expected)
    assert all(torch.equal(converted[key].reshape(expected[key].shape), expected[key]) for key in expected)


def test_presets_bring_the_published_latent_constants():
    published = {"sd_vae": (4, True, 0.18215, 0.0), "sdxl_vae": (4, True, 0.13025, 0.0),
                 "sd3_vae": (16, False, 1.5305, 0.0609), "flux_vae": (16, False, 0.3611, 0.1159)}
    for preset, (latent, quant, scale, shift) in published.items():
        cfg = compose_config([f"autoencoder={preset}"])
        assert (cfg.autoencoder.latent_channels, cfg.autoencoder.use_quant_conv) == (latent, quant), preset
        assert (cfg.diffusion.scale_factor, cfg.diffusion.shift_factor) == (scale, shift), preset
    cfg = compose_config(["autoencoder=kl"])  # the project's own VAEs keep having theirs measured
    assert (cfg.diffusion.scale_factor, cfg.diffusion.shift_factor) == (None, 0.0)


def test_full_size_architecture_has_the_reference_parameters():
    with torch.device("meta"):
        ours = SDAutoencoder()
        reference = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                                  down_block_types=("DownEncoderBlock2D",) * 4,
                                  up_block_types=("UpDecoderBlock2D",) * 4)
    count = sum(p.numel() for p in ours.parameters())
    assert count == sum(p.numel() for p in reference.parameters())
    assert round(count / 1e6, 1) == 83.7
    assert ours.downsample == 8


def test_export_is_read_by_diffusers(tmp_path):
    for variant, spec in VARIANTS.items():
        reference = reference_vae(spec["latent"], spec["quant"], **spec["constants"])
        ours = build(spec["preset"], save_layout(reference, "original_file", tmp_path))
        exported = AutoencoderKL.from_pretrained(to_diffusers(ours, tmp_path / f"export_{variant}")).eval()
        assert exported.config.scaling_factor == ours.scale_factor
        assert (exported.config.shift_factor or 0.0) == ours.shift_factor
        assert exported.config.latent_channels == spec["latent"]
        exported_state, expected = exported.state_dict(), reference.state_dict()
        assert set(exported_state) == set(expected)
        assert all(torch.equal(exported_state[key], expected[key]) for key in expected), variant
        original = original_state_dict(ours)
        assert set(original) == set(original_layout(reference))
        assert all(torch.equal(value, original[key]) for key, value in original_layout(reference).items())


def test_a_config_that_does_not_fit_the_weights_names_the_key_to_set(tmp_path):
    sd3 = reference_vae(16, False, **VARIANTS["sd3"]["constants"])
    with pytest.raises(WeightsError, match=r"set autoencoder\.latent_channels=16") as error:
        build("sd_vae", save_layout(sd3, "diffusers_dir", tmp_path))
    assert "autoencoder.use_quant_conv=false" in str(error.value)
    # a single file has no config.json: the same keys are named from the tensors' shapes
    with pytest.raises(WeightsError, match=r"set autoencoder\.latent_channels=16"):
        build("sd_vae", save_layout(sd3, "original_file", tmp_path))
    with pytest.raises(WeightsError, match=r"set autoencoder\.channel_mult=\[1,2\]"):
        build("sd3_vae", save_layout(sd3, "original_file", tmp_path), "autoencoder.channel_mult=[1,2,2]",
              "autoencoder.downsample=4")
    sdxl = reference_vae(scaling_factor=0.13025)
    with pytest.raises(WeightsError, match=r"set autoencoder\.scale_factor=0\.13025"):
        build("sd_vae", save_layout(sdxl, "diffusers_dir", tmp_path / "sdxl"))
    assert build("sdxl_vae", tmp_path / "sdxl" / "vae").scale_factor == 0.13025


def test_missing_weights_name_the_file_to_provide(tmp_path):
    with pytest.raises(WeightsError, match=r"autoencoder\.weights=.*missing_vae: no such file"):
        build("sd_vae", tmp_path / "missing_vae")
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsError, match=r"diffusion_pytorch_model\.safetensors"):
        build("sd_vae", tmp_path / "empty")
    save_file({"some.weight": torch.zeros(2)}, tmp_path / "other.safetensors")
    with pytest.raises(WeightsError, match="not a KL-VAE in a known layout"):
        build("sd_vae", tmp_path / "other.safetensors")


def test_tiles_blend_as_diffusers_tiling(tmp_path):
    """diffusers tiles 32-pixel tiles 24 apart; it also adds short tiles past the last full one, where the
    tiles here end flush with the image instead. Before that last strip the two must agree."""
    reference = reference_vae()
    ours = build("sd_vae", save_layout(reference, "diffusers_dir", tmp_path), "autoencoder.tile_size=32",
                 "autoencoder.tile_overlap=8")
    reference.enable_tiling()  # tiles of sample_size=32 pixels (16 latents), overlap factor 0.25
    assert (reference.tile_sample_min_size, reference.tile_latent_min_size) == (32, 16)
    images = torch.rand(2, 3, 56, 24, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        latents = ours.encode(images, sample=False)
        encoded = largest_relative_difference(latents[..., :24, :],
                                              reference.encode(images).latent_dist.mean[..., :24, :])
        decoded = largest_relative_difference(ours.decode(latents)[..., :48, :],
                                              reference.decode(latents).sample[..., :48, :])
    print(f"tiled vs diffusers' tiling: encode mean {encoded:.2e}, decode {decoded:.2e}")
    assert encoded <= TOLERANCE and decoded <= TOLERANCE


def test_an_image_that_fits_one_tile_is_not_tiled(tmp_path):
    path = save_layout(reference_vae(), "diffusers_dir", tmp_path)
    plain, tiles = build("sd_vae", path), build("sd_vae", path, "autoencoder.tile_size=32")
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.equal(plain.encode(images, sample=False), tiles.encode(images, sample=False))
        latents = torch.randn(2, 4, 16, 16)
        assert torch.equal(plain.decode(latents), tiles.decode(latents))


@pytest.mark.parametrize("name,fn", [("pool", lambda x: F.avg_pool2d(x, 4)),
                                     ("upsample", lambda x: F.interpolate(x, scale_factor=4.0)),
                                     ("pointwise", lambda x: torch.tanh(3 * x) + x ** 2)])
def test_tiling_a_map_that_acts_on_each_place_alone_changes_nothing(name, fn):
    """Blending must put each tile back where it came from, with weights that add up to one."""
    images = torch.randn(2, 3, 72, 40, generator=torch.Generator().manual_seed(3))
    for tile, overlap in [(16, 4), (24, 8), (32, 12)]:
        assert torch.allclose(tiled(fn, images, tile, overlap), fn(images), atol=1e-5), (name, tile, overlap)


def test_slices_give_the_whole_batch_result(tmp_path):
    path = save_layout(reference_vae(), "diffusers_dir", tmp_path)
    nchw = "autoencoder.channels_last=false"  # torch's own NCHW kernels are batch-size-independent
    plain, slices = build("sd_vae", path, nchw), build("sd_vae", path, nchw, "autoencoder.slice_size=2")
    images, latents = torch.rand(5, 3, 32, 32) * 2 - 1, torch.randn(5, 4, 16, 16)
    with torch.no_grad(), torch.backends.mkldnn.flags(enabled=False):
        assert torch.equal(plain.encode(images, sample=False), slices.encode(images, sample=False))
        assert torch.equal(plain.decode(latents), slices.decode(latents))
    plain, slices = build("sd_vae", path), build("sd_vae", path, "autoencoder.slice_size=2")
    with torch.no_grad():  # oneDNN picks kernels by batch size: equal to rounding
        assert largest_relative_difference(slices.encode(images, sample=False),
                                           plain.encode(images, sample=False)) < 1e-5
        assert largest_relative_difference(slices.decode(latents), plain.decode(latents)) < 1e-5


def test_a_pretrained_vae_is_frozen_and_kept_out_of_checkpoints(tmp_path):
    from ldm.run.build import build_diffusion
    from ldm.utils.fingerprint import module_fingerprint

    path = save_layout(reference_vae(), "diffusers_dir", tmp_path)
    cfg = compose_config(["autoencoder=sd_vae", f"autoencoder.weights={path}", *SMALL,
                          "model.depth=1", "model.hidden_size=32", "model.num_heads=2"])
    model = build_diffusion(cfg)
    assert not any(p.requires_grad for p in model.autoencoder.parameters())
    assert float(model.latent_scale) == pytest.approx(0.18215) and bool(model.latent_stats_ready)
    checkpoint = {"state_dict": model.state_dict()}
    model.on_save_checkpoint(checkpoint)
    assert not any(key.startswith("autoencoder.") for key in checkpoint["state_dict"])
    assert checkpoint["frozen_parts"]["autoencoder"] == module_fingerprint(model.autoencoder)


@pytest.mark.slow
def test_full_size_sd_vae_matches_diffusers(tmp_path):
    reference = reference_vae(blocks=(128, 256, 512, 512))
    path = save_layout(reference, "original_ckpt", tmp_path)
    cfg = compose_config(["autoencoder=sd_vae", f"autoencoder.weights={path}", "autoencoder.in_channels=3"])
    ours = hydra.utils.instantiate(cfg.autoencoder).eval()
    assert round(sum(p.numel() for p in ours.parameters()) / 1e6, 1) == 83.7
    encoded, decoded = compare(ours, reference, size=64)
    print(f"full-size SD VAE, 64x64: encode mean {encoded:.2e}, decode {decoded:.2e}")
    assert encoded <= TOLERANCE and decoded <= TOLERANCE


class ConvolutionLayouts(TorchDispatchMode):
    """Records, for every convolution that runs, whether its input is NHWC in memory."""

    def __init__(self):
        super().__init__()
        self.nhwc = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.convolution.default:
            self.nhwc.append(args[0].is_contiguous(memory_format=torch.channels_last))
        return func(*args, **(kwargs or {}))


def test_channels_last_runs_every_convolution_on_nhwc_maps_on_the_cpu_with_the_same_results(tmp_path):
    path = save_layout(reference_vae(), "diffusers_dir", tmp_path)
    default, nchw = build("sd_vae", path), build("sd_vae", path, "autoencoder.channels_last=false")
    images, latents = torch.rand(2, 3, 32, 32) * 2 - 1, torch.randn(2, 4, 16, 16)
    convolutions = sum(isinstance(m, torch.nn.Conv2d) for m in default.modules())
    with torch.no_grad():
        with ConvolutionLayouts() as layouts:
            encoded, decoded = default.encode(images, sample=False), default.decode(latents)
        assert len(layouts.nhwc) == convolutions and all(layouts.nhwc)
        with ConvolutionLayouts() as layouts:
            expected_encoded, expected_decoded = nchw.encode(images, sample=False), nchw.decode(latents)
        assert not any(layouts.nhwc)
    # the default layout, as the latent cache and image files take them (the mean is a channel slice)
    assert encoded.stride()[1:] == (16 * 16, 16, 1) and decoded.is_contiguous()
    assert largest_relative_difference(encoded, expected_encoded) < 1e-5
    assert largest_relative_difference(decoded, expected_decoded) < 1e-5
    assert all(p.is_contiguous() for p in default.parameters())  # weights save as they are
