"""Published weights loaded with the weights path and the defaults: diffusers' outputs, or one refusal.

Each row composes the real training config as a user would (`model=unet_sd model.weights=DIR`, ...), with
only the sizes of the tiny random files of these tests added, then runs the config check and, when it
passes, builds the whole run (`build_diffusion`) and compares its prediction, time going through the
schedule, with the diffusers model (or the published DiT code) on the same weights. What a file cannot
load into the network (its time input, sinusoids, position layout, class table) must never differ silently.
"""

from __future__ import annotations

import pytest
import torch
from conftest import compose_config, perturb
from diffusers import DiTTransformer2DModel, UNet2DConditionModel
from hydra.errors import InstantiationException
from safetensors.torch import save_file
from test_pretrained_dit import published_state
from test_pretrained_unet import original_checkpoint

from ldm.checks.sampling import sampling_problems
from ldm.checks.training import check_training
from ldm.contracts.conditioning import Conditioning
from ldm.run.build import build_diffusion
from ldm.utils.errors import ConfigError
from ldm.weights.files import WeightsError
from ldm.weights.unet import to_diffusers

pytestmark = pytest.mark.usefixtures("one_thread")

LEVELS = [0, 10, 500, 999]
TOLERANCE = 1e-4

# a tiny SD-1-like UNet on 16x16 RGB images (autoencoder=identity), attending to 128-wide text tokens
UNET_SIZE, CONTEXT = 16, 128
SD_CONFIG = dict(block_out_channels=(32, 64, 64), layers_per_block=2, cross_attention_dim=CONTEXT,
                 attention_head_dim=2, in_channels=3, out_channels=3, sample_size=UNET_SIZE,
                 down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
UNET_SIZES = ["data=shapes", f"data.image_size={UNET_SIZE}", "autoencoder=identity", "conditioner=clip_text_random",
              "conditioner.vector_dim=null", "conditioner.embedders.0.fields=[tokens]", "model.channels=32",
              "model.channel_mult=[1,2,2]", "model.num_res_blocks=2", "model.attention_resolutions=[1,2]",
              "model.num_heads=2"]
# a tiny class-conditional DiT (1000 classes, as ImageNet's) on 8x8 gray digits (autoencoder=identity)
HIDDEN, HEADS, DEPTH, PATCH, DIT_SIZE, CHANNELS = 64, 4, 2, 2, 8, 1
DIT_SIZES = ["autoencoder=identity", f"data.image_size={DIT_SIZE}", f"model.hidden_size={HIDDEN}",
             f"model.depth={DEPTH}", f"model.num_heads={HEADS}", f"model.patch_size={PATCH}"]
# the settings the published DiT needs, as the error messages and the dit_xl2_256 preset give them
DIT_FLAGS = ["model.pos_embed_layout=col_sin_cos", "model.time_scale=1", "schedule=ddpm", "schedule.time_input=level",
             "model.learn_sigma=true"]


def sd_unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return perturb(UNet2DConditionModel(**SD_CONFIG), scale=0.05, seed=1).eval()


def diffusers_dit(frequency_shift: int = 1) -> DiTTransformer2DModel:
    """A random diffusers DiT whose blocks share one embedder; `frequency_shift` 0 is the published DiT code's."""
    torch.manual_seed(0)
    model = DiTTransformer2DModel(num_attention_heads=HEADS, attention_head_dim=HIDDEN // HEADS, in_channels=CHANNELS,
                                  out_channels=2 * CHANNELS, num_layers=DEPTH, sample_size=DIT_SIZE, patch_size=PATCH,
                                  num_embeds_ada_norm=1000)
    perturb(model, scale=0.1, seed=2)
    first = model.transformer_blocks[0].norm1.emb
    for block in model.transformer_blocks:
        block.norm1.emb.load_state_dict(first.state_dict())
        block.norm1.emb.time_proj.downscale_freq_shift = frequency_shift
    return model.eval()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Each published layout of the tiny networks: (its path, the reference model that computes it)."""
    root = tmp_path_factory.mktemp("published")
    unet, dit = sd_unet(), diffusers_dit()
    unet.save_pretrained(root / "sd" / "unet")  # a pipeline directory
    save_file(original_checkpoint(unet), root / "v1-5-pruned.safetensors")
    adm = perturb(build_diffusion(composed("adm", None, ["model=unet"])).denoiser, scale=0.05, seed=4)
    to_diffusers(adm, root / "adm")  # this project's ADM UNet, trained on t * 1000 for t in [0, 1]
    dit.save_pretrained(root / "dit")
    torch.save(published_state(dit), root / "DiT-XL-2-256x256.pt")
    return {"adm": (root / "adm", UNet2DConditionModel.from_pretrained(root / "adm").eval()),
            "sd": (root / "sd", unet), "sd_original": (root / "v1-5-pruned.safetensors", unet),
            "dit": (root / "dit", dit), "dit_published": (root / "DiT-XL-2-256x256.pt", diffusers_dit(0))}


# (file, the user's overrides, None when the run equals the reference, else the keys its one refusal names)
ROWS = {
    "adm/defaults": ("adm", ["model=unet"], None),
    "adm/ddpm_level": ("adm", ["model=unet", "schedule=ddpm", "schedule.time_input=level", "model.time_scale=1"],
                       "set model.time_scale=1000.0 schedule.time_input=unit"),
    "sd/defaults": ("sd", ["model=unet_sd"], "set schedule=ddpm schedule.time_input=level"),
    "sd/ddpm": ("sd", ["model=unet_sd", "schedule=ddpm"], "set schedule.time_input=level"),
    "sd/ddpm_level": ("sd", ["model=unet_sd", "schedule=ddpm", "schedule.time_input=level"], None),
    "sd/v_level_adm_time": ("sd", ["model=unet_sd", "schedule=v", "schedule.time_input=level",
                                   "model.time_scale=1000"], "set model.time_scale=1"),
    "sd_original/ddpm": ("sd_original", ["model=unet_sd", "schedule=ddpm"], "set schedule.time_input=level"),
    "sd_original/ddpm_level": ("sd_original", ["model=unet_sd", "schedule=ddpm", "schedule.time_input=level"], None),
    "dit/defaults": ("dit", ["model=dit"], "set model.time_scale=1 schedule=ddpm schedule.time_input=level "
                     "model.learn_sigma=true conditioner=imagenet"),
    "dit/flags_class": ("dit", ["model=dit", *DIT_FLAGS, "model.time_frequency_shift=1",
                                f"conditioner.vector_dim={HIDDEN}"], "set conditioner=imagenet"),
    "dit/flags_shift0": ("dit", ["model=dit", *DIT_FLAGS, "model.time_frequency_shift=0", "conditioner=imagenet"],
                         "set model.time_frequency_shift=1"),
    "dit/flags_imagenet": ("dit", ["model=dit", *DIT_FLAGS, "model.time_frequency_shift=1", "conditioner=imagenet"],
                           None),
    "dit_published/defaults": ("dit_published", ["model=dit"], "set model.time_scale=1 schedule=ddpm "
                               "schedule.time_input=level model.learn_sigma=true conditioner=imagenet"),
    "dit_published/flags_class": ("dit_published", ["model=dit", *DIT_FLAGS, "model.time_frequency_shift=0",
                                                    f"conditioner.vector_dim={HIDDEN}"],
                                  "set conditioner=imagenet"),
    "dit_published/flags_imagenet": ("dit_published", ["model=dit", *DIT_FLAGS, "model.time_frequency_shift=0",
                                                       "conditioner=imagenet"], None),
}


def composed(name: str, path, overrides: list[str]):
    sizes = DIT_SIZES if name.startswith("dit") else UNET_SIZES
    return compose_config([*overrides, *sizes] + ([f"model.weights={path}"] if path else []))


@torch.no_grad()
def relative_difference(module, reference, name: str) -> float:
    """Largest relative difference of the run's prediction (time through its schedule) to the reference's."""
    generator = torch.Generator().manual_seed(3)
    levels = torch.tensor(LEVELS)
    t = (levels + 1) / 1000.0
    if not name.startswith("dit"):  # Stable Diffusion's UNet takes the level, an exported ADM t * 1000
        x = torch.randn(len(LEVELS), 3, UNET_SIZE, UNET_SIZE, generator=generator)
        tokens = torch.randn(len(LEVELS), 8, CONTEXT, generator=generator)
        ours = module.predict(x, t, Conditioning(tokens=tokens))
        theirs = reference(x, levels if name.startswith("sd") else t * 1000, encoder_hidden_states=tokens).sample
    else:
        x = torch.randn(len(LEVELS), CHANNELS, DIT_SIZE, DIT_SIZE, generator=generator)
        labels = torch.tensor([0, 3, 9, 5])  # classes of data=digits too: a random table takes them
        ours = module.predict(x, t, module.conditioner({"label": labels}))
        theirs = reference(x, timestep=levels, class_labels=labels).sample[:, :CHANNELS]
    assert not torch.equal(ours[0], ours[-1])  # the levels reach the network
    return ((ours - theirs).abs().max() / theirs.abs().max()).item()


def differs_or_is_refused_when_built(cfg, reference, name: str) -> bool:
    """What the refused config would have run: a refusal of the loader (named keys), or another network."""
    try:
        module = build_diffusion(cfg).eval()
    except InstantiationException as error:
        assert isinstance(error.__cause__, WeightsError), error
        return True
    difference = relative_difference(module, reference, name)
    print(f"    built without the check: largest relative difference {difference:.2e}")
    return difference > 100 * TOLERANCE


@pytest.mark.parametrize("row", sorted(ROWS))
def test_published_weights_load_as_published_or_are_refused(files, row):
    name, overrides, refusal = ROWS[row]
    path, reference = files[name]
    cfg = composed(name, path, overrides)
    if refusal is not None:
        with pytest.raises(ConfigError) as error:
            check_training(cfg)
        print(f"{row}: refused: {error.value.errors}")
        assert len(error.value.errors) == 1, error.value.errors
        assert error.value.errors[0].startswith(f"model.weights={path} is ")
        assert error.value.errors[0].endswith(refusal)
        assert differs_or_is_refused_when_built(cfg, reference, name)
        return
    check_training(cfg)
    difference = relative_difference(build_diffusion(cfg).eval(), reference, name)
    print(f"{row}: equal, largest relative difference {difference:.2e}")
    assert difference <= TOLERANCE


def test_a_preset_for_sample_py_is_checked_against_its_weights(files):
    path, _ = files["dit"]
    weights = f"preset_overrides=['dit_weights={path}','vae_weights=/weights/sd-vae-ft-ema']"
    problems = sampling_problems(compose_config(["preset=dit_xl2_256", weights, "n=1"], name="sample"))
    assert problems == [f"preset=dit_xl2_256: model.weights={path} is a DiT in the diffusers DiTTransformer2DModel "
                        "format, trained on the integer DDPM level k, with a class table of 1000 classes and the null "
                        "class; this config would run it as another network: set model.time_frequency_shift=1"]
