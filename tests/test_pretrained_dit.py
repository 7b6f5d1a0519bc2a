"""DiT weights in the published and diffusers formats against diffusers' DiTTransformer2DModel and DiTPipeline."""

from __future__ import annotations

import json

import hydra
import pytest
import torch
from conftest import compose_config, perturb
from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel
from diffusers.models.embeddings import get_2d_sincos_pos_embed
from hydra.errors import InstantiationException

from ldm.conditioners.class_embedder import class_indices, imagenet_class_names
from ldm.contracts.autoencoder import Autoencoder
from ldm.tasks.diffusion import LatentDiffusion
from ldm.weights.dit import to_diffusers
from ldm.weights.files import WeightsError

HIDDEN, HEADS, DEPTH, PATCH, SIZE, CHANNELS, CLASSES = 64, 4, 2, 2, 8, 4, 10
LEVELS = [0, 10, 500, 999]
# the tiny DiT of these tests, pretrained-style: level time input, learned sigma, DiT's position embedding
TINY = [f"model.hidden_size={HIDDEN}", f"model.depth={DEPTH}", f"model.num_heads={HEADS}", f"model.patch_size={PATCH}",
        f"model.input_size={SIZE}", f"model.in_channels={CHANNELS}", "model.learn_sigma=true", "model.time_scale=1",
        "model.pos_embed_layout=col_sin_cos", "schedule=ddpm", "schedule.time_input=level", "sampler=euler"]


pytestmark = pytest.mark.usefixtures("one_thread")




def reference_dit(num_classes: int = CLASSES, seed: int = 0) -> DiTTransformer2DModel:
    """A random diffusers DiT whose blocks share one timestep and class embedder, as converted checkpoints do."""
    torch.manual_seed(seed)
    model = DiTTransformer2DModel(num_attention_heads=HEADS, attention_head_dim=HIDDEN // HEADS, in_channels=CHANNELS,
                                  out_channels=2 * CHANNELS, num_layers=DEPTH, sample_size=SIZE, patch_size=PATCH,
                                  num_embeds_ada_norm=num_classes)
    perturb(model, scale=0.1, seed=seed)
    with torch.no_grad():
        first = model.transformer_blocks[0].norm1.emb
        for block in model.transformer_blocks[1:]:
            block.norm1.emb.load_state_dict(first.state_dict())
    return model.eval()  # diffusers drops labels at random in training mode


def published_state(model: DiTTransformer2DModel) -> dict[str, torch.Tensor]:
    """The diffusers weights under the published DiT checkpoint's names (facebookresearch/DiT models.py)."""
    theirs, out, config = model.state_dict(), {}, model.config
    emb = "transformer_blocks.0.norm1.emb."
    for suffix in ("weight", "bias"):
        out[f"x_embedder.proj.{suffix}"] = theirs[f"pos_embed.proj.{suffix}"]
        out[f"t_embedder.mlp.0.{suffix}"] = theirs[f"{emb}timestep_embedder.linear_1.{suffix}"]
        out[f"t_embedder.mlp.2.{suffix}"] = theirs[f"{emb}timestep_embedder.linear_2.{suffix}"]
        out[f"final_layer.adaLN_modulation.1.{suffix}"] = theirs[f"proj_out_1.{suffix}"]
        out[f"final_layer.linear.{suffix}"] = theirs[f"proj_out_2.{suffix}"]
        for i in range(config.num_layers):
            block = f"transformer_blocks.{i}."
            out[f"blocks.{i}.attn.qkv.{suffix}"] = torch.cat(
                [theirs[f"{block}attn1.to_{name}.{suffix}"] for name in ("q", "k", "v")])
            out[f"blocks.{i}.attn.proj.{suffix}"] = theirs[f"{block}attn1.to_out.0.{suffix}"]
            out[f"blocks.{i}.mlp.fc1.{suffix}"] = theirs[f"{block}ff.net.0.proj.{suffix}"]
            out[f"blocks.{i}.mlp.fc2.{suffix}"] = theirs[f"{block}ff.net.2.{suffix}"]
            out[f"blocks.{i}.adaLN_modulation.1.{suffix}"] = theirs[f"{block}norm1.linear.{suffix}"]
    out["y_embedder.embedding_table.weight"] = theirs[f"{emb}class_embedder.embedding_table.weight"]
    grid, width = config.sample_size // config.patch_size, config.num_attention_heads * config.attention_head_dim
    out["pos_embed"] = get_2d_sincos_pos_embed(width, grid, base_size=grid).float()[None]
    return {key: value.clone() for key, value in out.items()}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A diffusers directory and a published-format .pt of the same random DiT, and that DiT."""
    root = tmp_path_factory.mktemp("dit")
    model = reference_dit()
    model.save_pretrained(root / "diffusers")
    torch.save(published_state(model), root / "DiT-tiny.pt")
    return {"diffusers": root / "diffusers", "published": root / "DiT-tiny.pt", "model": model}


def build(weights, *overrides: str, classes: int = CLASSES):
    cfg = compose_config(TINY + ["conditioner=imagenet", f"conditioner.embedders.0.num_classes={classes}",
                                 f"model.weights={weights}", *overrides])
    return (hydra.utils.instantiate(cfg.model), hydra.utils.instantiate(cfg.conditioner).eval(),
            hydra.utils.instantiate(cfg.schedule))


def refused(message: str):
    """A build that fails with a WeightsError matching `message` (Hydra wraps what a target raises)."""
    return pytest.raises(InstantiationException, match=message)


def largest_relative_difference(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return ((ours - reference).abs().max() / reference.abs().max()).item()


def compare_at_levels(dit, conditioner, schedule, reference) -> float:
    """Largest relative difference of the epsilon half over labels and levels, time going through the schedule."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(len(LEVELS), CHANNELS, SIZE, SIZE, generator=generator)
    labels = torch.tensor([0, 3, 9, 5])
    t = torch.tensor([(k + 1) / 1000 for k in LEVELS], dtype=torch.float32)
    with torch.no_grad():
        x_in, t_in = schedule.model_input(x, t)
        ours = dit(x_in, t_in, conditioner({"label": labels}))
        theirs = reference(x, timestep=torch.tensor(LEVELS), class_labels=labels).sample[:, :CHANNELS]
    return largest_relative_difference(ours, theirs)


def test_diffusers_directory_matches_diffusers(files):
    difference = compare_at_levels(*build(files["diffusers"], "model.time_frequency_shift=1"), files["model"])
    print(f"diffusers directory: largest relative difference {difference:.2e}")
    assert difference <= 1e-4
    with refused("set model.time_frequency_shift=1"):  # the published code's sinusoids: not this file's
        build(files["diffusers"], "model.time_frequency_shift=0")


def test_published_checkpoint_matches_the_published_code(files):
    # the published code embeds time with frequency shift 0; diffusers' model with its shift set to 0
    # computes that (its other difference, layer-norm eps 1e-5 instead of 1e-6, is below the tolerance)
    reference = reference_dit()
    for block in reference.transformer_blocks:
        block.norm1.emb.time_proj.downscale_freq_shift = 0
    difference = compare_at_levels(*build(files["published"], "model.time_frequency_shift=0"), reference)
    print(f"published .pt: largest relative difference {difference:.2e}")
    assert difference <= 1e-4
    # and with shift 1 the same file gives diffusers' outputs
    assert compare_at_levels(*build(files["published"], "model.time_frequency_shift=1"), files["model"]) <= 1e-4


@pytest.mark.parametrize("override, message", [
    ("model.learn_sigma=false", "set model.learn_sigma=true"),
    ("model.hidden_size=32", "set model.hidden_size=64"),
    ("model.depth=3", "set model.depth=2"),
    ("model.pos_embed_layout=row_cos_sin", "set model.pos_embed_layout=col_sin_cos"),
    ("model.time_scale=1000", "set model.time_scale=1 "),
])
def test_wrong_architecture_names_the_key(files, override, message):
    extra = ["conditioner.vector_dim=64"] if override.startswith("model.hidden_size") else []
    for form in ("diffusers", "published"):
        with refused(message) as error:
            build(files[form], override, *extra)
        assert isinstance(error.value.__cause__, WeightsError)


def test_class_table_shape_and_embedder_copies_are_checked(files, tmp_path):
    with refused("set num_classes=10"):
        build(files["diffusers"], "model.time_frequency_shift=1", classes=1000)
    model = reference_dit()
    with torch.no_grad():
        model.transformer_blocks[1].norm1.emb.class_embedder.embedding_table.weight[3] += 1
    model.save_pretrained(tmp_path)
    with refused(r"transformer_blocks.1.norm1.emb.class_embedder.* differs from block 0"):
        build(tmp_path)


def test_to_diffusers_gives_identical_outputs(files, tmp_path):
    cfg = compose_config(TINY + ["conditioner=imagenet", f"conditioner.embedders.0.num_classes={CLASSES}",
                                 "model.time_frequency_shift=1"])
    dit = perturb(hydra.utils.instantiate(cfg.model), scale=0.1, seed=3)
    conditioner = hydra.utils.instantiate(cfg.conditioner)
    perturb(conditioner, scale=0.1, seed=4)
    to_diffusers(dit, conditioner.embedders[0], tmp_path / "export")
    assert json.loads((tmp_path / "export" / "config.json").read_text())["out_channels"] == 2 * CHANNELS
    exported = DiTTransformer2DModel.from_pretrained(tmp_path / "export").eval()
    difference = compare_at_levels(dit, conditioner.eval(), hydra.utils.instantiate(cfg.schedule), exported)
    print(f"to_diffusers: largest relative difference {difference:.2e}")
    assert difference <= 1e-4
    assert json.loads((tmp_path / "export" / "config.json").read_text())["_ldm_time_scale"] == 1.0
    with pytest.raises(WeightsError, match="set model.time_frequency_shift=1 and train anew"):
        dit.t_embedder.frequency_shift = 0.0
        to_diffusers(dit, conditioner.embedders[0], tmp_path / "refused")


def test_imagenet_class_names():
    names = imagenet_class_names()
    assert len(names) == 1000 and names[1] == "goldfish"
    assert class_indices(["goldfish", 207, "Tench"], names) == [1, 207, 0]
    with pytest.raises(ValueError, match=r"'cardigan' names the classes \[264, 474\]"):
        class_indices(["cardigan"], names)  # a dog and a sweater
    with pytest.raises(ValueError, match="close: goldfish"):
        class_indices(["goldfsh"], names)


# ---------------------------------------------------------------- DDIM: euler sampler vs DiTPipeline

class DiffusersDecoder(Autoencoder):
    """Decodes with a diffusers AutoencoderKL, for sampling only."""

    def __init__(self, vae: AutoencoderKL):
        super().__init__()
        self.vae, self.downsample, self.latent_channels = vae, 2, vae.config.latent_channels

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents).sample


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    """The same random DiT (1000 classes: DiTPipeline's null class is 1000) and VAE, in diffusers and in ldm."""
    root = tmp_path_factory.mktemp("dit_ddim")
    transformer = reference_dit(num_classes=1000, seed=5)
    transformer.save_pretrained(root)
    torch.manual_seed(6)
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=CHANNELS, norm_num_groups=4,
                        layers_per_block=1, sample_size=2 * SIZE, scaling_factor=0.7).eval()
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                              clip_sample=False, set_alpha_to_one=True, timestep_spacing="trailing")
    pipeline = DiTPipeline(transformer=transformer, vae=vae, scheduler=scheduler)
    pipeline.set_progress_bar_config(disable=True)
    cfg = compose_config(TINY + ["conditioner=imagenet", f"model.weights={root}", "model.time_frequency_shift=1"])
    module = LatentDiffusion(
        autoencoder=DiffusersDecoder(vae), conditioner=hydra.utils.instantiate(cfg.conditioner),
        denoiser=hydra.utils.instantiate(cfg.model), schedule=hydra.utils.instantiate(cfg.schedule),
        sampler=hydra.utils.instantiate(cfg.sampler), image_size=2 * SIZE, scale_factor=0.7, shift_factor=0.0)
    return pipeline, module


@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_euler_sampler_is_dit_pipeline_ddim(pipelines, guidance):
    pipeline, module = pipelines
    labels, steps = [207, 1, 999], 10
    with torch.no_grad():
        theirs = pipeline(class_labels=labels, guidance_scale=guidance, num_inference_steps=steps,
                          generator=torch.Generator().manual_seed(0), output_type="pt").images
    ours = module.sample({"label": torch.tensor(labels)}, len(labels), steps=steps, guidance=guidance,
                         generator=torch.Generator().manual_seed(0))
    difference = ((ours + 1) / 2 - theirs).abs().max().item()  # ldm's images are in [-1, 1], diffusers' in [0, 1]
    print(f"DDIM, guidance {guidance}: largest image difference {difference:.2e}")
    assert theirs.std() > 0.01 and difference <= 1e-4
