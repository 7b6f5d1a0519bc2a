"""experiment=sd15_finetune on a tiny random-weight SD-1 diffusers directory: it trains from the published
weights, leaves the frozen parts out of its checkpoints, resumes, exports a UNet diffusers loads, and
sample.py draws from the preset without a run directory."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import compose_config, perturb, run_script, train_run
from forked import run
from PIL import Image

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

CONTEXT = 32
SIZES = [  # the project's config of the tiny directory below
    "data.image_size=16", "data.batch_size=4", "data.num_workers=0", "data.val_fraction=0.25",
    "autoencoder.channels=32", "autoencoder.channel_mult=[1,2]", "autoencoder.downsample=2",
    "model.channels=32", "model.channel_mult=[1,2]", "model.num_res_blocks=1", "model.attention_resolutions=[1,2]",
    "model.num_heads=2", f"conditioner.context_dim={CONTEXT}",
    f"+conditioner.embedders.0.text_cfg={{width:{CONTEXT},heads:4,layers:2,context_length:77,vocab_size:49408}}",
    "trainer.accelerator=cpu", "diffusion.sample_steps=2", "callbacks.sample_grid.per_row=2",
    "callbacks.ema.update_starting_at_step=0", "callbacks.ema.decay=0.9", "lr_scheduler.warmup_steps=0",
    "optimizer.lr=1e-3", "trainer.val_check_interval=2", "logger=csv",
]




def sd_directory(root):
    """A diffusers SD-1 pipeline directory (vae/, unet/, text_encoder/) with small random networks."""
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=2, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=32, scaling_factor=0.18215)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=CONTEXT,
        attention_head_dim=2, norm_num_groups=32)
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        hidden_size=CONTEXT, intermediate_size=4 * CONTEXT, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, vocab_size=49408, hidden_act="quick_gelu"))
    perturb(vae, seed=1).eval().save_pretrained(root / "vae")
    perturb(unet, seed=2).eval().save_pretrained(root / "unet")
    perturb(text, seed=3).eval().save_pretrained(root / "text_encoder")
    return unet


def image_folder(root, count: int = 8):
    root.mkdir()
    rng = np.random.default_rng(0)
    records = []
    for index in range(count):
        pixels = rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"{index}.png")
        records.append(json.dumps({"file_name": f"{index}.png", "text": f"a picture number {index}"}))
    (root / "metadata.jsonl").write_text("\n".join(records) + "\n")
    return root


@pytest.fixture(scope="module")
def sd_setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("sd15")
    unet = sd_directory(base / "sd")
    return base, unet, ["experiment=sd15_finetune", f"pretrained_dir={base / 'sd'}",
                        f"root={image_folder(base / 'images')}", *SIZES]


def test_finetune_starts_from_the_published_unet_checkpoints_without_frozen_parts_and_resumes(sd_setup, tmp_path):
    base, reference, overrides = sd_setup
    cfg = compose_config(overrides + ["trainer.max_steps=0"])
    from ldm.run.build import build_diffusion

    module = build_diffusion(cfg)
    for name, value in reference.state_dict().items():  # spot check: the UNet starts as the directory's
        if name == "conv_in.weight":
            assert torch.equal(module.denoiser.conv_in.weight, value)
    assert module.latent_scale.item() == pytest.approx(0.18215)

    run = tmp_path / "run"
    train_run(overrides + ["trainer.max_steps=2"], run)
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    keys = checkpoint["state_dict"].keys()
    assert any(key.startswith("denoiser.") for key in keys)
    assert not any(key.startswith(("autoencoder.", "conditioner.embedders.0.text")) for key in keys)
    assert set(checkpoint["frozen_parts"]) >= {"autoencoder"}
    assert checkpoint["global_step"] == 2
    start = checkpoint["state_dict"]["denoiser.conv_in.weight"]
    assert not torch.equal(start, reference.conv_in.weight)  # it trained

    # the same command with a later end resumes from step 2
    train_run(overrides + ["trainer.max_steps=4"], run)
    resumed = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert resumed["global_step"] == 4
    log = (run / "train.log").read_text() if (run / "train.log").exists() else ""
    assert "resuming" in log or resumed["global_step"] == 4

    # export: diffusers loads the fine-tuned UNet and computes what the project's UNet computes
    from ldm.commands.export import export
    from ldm.run.load import load_run

    out = export(str(run), part="denoiser", out=str(tmp_path / "export"))
    loaded = diffusers.UNet2DConditionModel.from_pretrained(out).eval()
    _, trained = load_run(run)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    context = torch.randn(2, 77, CONTEXT, generator=torch.Generator().manual_seed(1))
    k = torch.tensor([10.0, 900.0])
    from ldm.contracts.conditioning import Conditioning

    with torch.no_grad():
        ours = trained.denoiser(x, k, Conditioning(tokens=context))
        theirs = loaded(x, k, encoder_hidden_states=context).sample
    assert (ours - theirs).abs().max() / theirs.abs().max() < 1e-4
    assert not torch.equal(loaded.conv_in.weight, reference.conv_in.weight)


def test_sample_py_draws_from_the_preset_without_a_run_directory(sd_setup, tmp_path):
    base, _, overrides = sd_setup
    preset = [item for item in overrides if not item.startswith("experiment=")]
    out = tmp_path / "samples.npz"
    arguments = ["preset=sd15_finetune", f"preset_overrides=[{','.join(repr(item) for item in preset)}]",
                 "n=2", "steps=2", "guidance=3", "prompts=[\"a picture\"]", f"out={out}", "device=cpu"]
    result = run_script("sample.py", *arguments)
    assert result.returncode == 0, result.stderr[-3000:]
    images = np.load(out)["images"]
    assert images.shape == (2, 16, 16, 3) and images.std() > 0


def test_missing_pretrained_dir_is_named():
    import os

    from conftest import ROOT

    env = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "LDM_DEBUG")}
    result = run("sample.py", "preset=sd15_finetune", "n=1", cwd=ROOT, env=dict(env, PYTHONPATH=str(ROOT)))
    assert result.returncode == 2, result.stderr[-2000:]
    assert "error: preset=sd15_finetune needs pretrained_dir" in result.stderr


def test_lora_on_the_published_unet_stores_adapters_exports_them_and_refuses_another_base(sd_setup, tmp_path):
    """finetune=lora from model.weights: the checkpoints hold the adapters only, the exported file loads into the
    published UNet with diffusers' LoRA loader and computes what the run computes, and a changed weights file is
    refused by its hash."""
    import shutil

    from ldm.commands.export import export
    from ldm.contracts.conditioning import Conditioning
    from ldm.run.load import load_run
    from ldm.utils.checkpoint import CheckpointError

    base, _, overrides = sd_setup
    directory = tmp_path / "sd"
    shutil.copytree(base / "sd", directory)
    overrides = [item for item in overrides if not item.startswith("pretrained_dir=")] + [
        f"pretrained_dir={directory}", "finetune=lora", "finetune.targets=[attention,mlp,convs]"]
    run = tmp_path / "run"
    train_run(overrides + ["trainer.max_steps=2"], run)
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert all(".lora_" in key for key in checkpoint["state_dict"] if key.startswith("denoiser."))
    assert "base.denoiser" in checkpoint["frozen_parts"]

    state = checkpoint["state_dict"]
    generator = torch.Generator().manual_seed(0)
    for key in state:  # the adapters off their start, where zero up projections would hide a wrong key
        if ".lora_B." in key:
            state[key] += 0.1 * torch.randn(state[key].shape, generator=generator)
    checkpoint.pop("ema_state_dict")
    torch.save(checkpoint, run / "checkpoints" / "last.ckpt")
    path = export(str(run), out=str(tmp_path / "export"))
    loaded = diffusers.UNet2DConditionModel.from_pretrained(directory / "unet").eval()
    loaded.load_lora_adapter(str(path), prefix="unet")
    _, trained = load_run(run)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    context = torch.randn(2, 77, CONTEXT, generator=torch.Generator().manual_seed(1))
    k = torch.tensor([10.0, 900.0])
    with torch.no_grad():
        ours = trained.denoiser(x, k, Conditioning(tokens=context))
        theirs = loaded(x, k, encoder_hidden_states=context).sample
        loaded.disable_adapters()
        plain = loaded(x, k, encoder_hidden_states=context).sample
    assert (ours - theirs).abs().max() / theirs.abs().max() < 1e-4
    assert (plain - theirs).abs().max() / theirs.abs().max() > 1e-2  # the adapters matter

    other = diffusers.UNet2DConditionModel.from_pretrained(directory / "unet")
    perturb(other, seed=5).save_pretrained(directory / "unet")  # another base in the same place
    with pytest.raises(CheckpointError, match="frozen part 'base.denoiser' differs"):
        load_run(run)
