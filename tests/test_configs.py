"""Every option of every config group composes, resolves, has only known keys and (where cheap) instantiates."""

from __future__ import annotations

import hydra
import pytest
import yaml
from conftest import CONF, compose_config
from omegaconf import OmegaConf

from ldm.checks.keys import check_keys, config_errors
from ldm.tasks.autoencoder import AutoencoderTraining

GROUPS = ["data", "autoencoder", "conditioner", "model", "schedule", "sampler", "trainer", "callbacks", "logger",
          "experiment", "hparams_search", "launcher", "debug", "task", "optimizer", "lr_scheduler"]
OPTIONS = [(group, path.stem) for group in GROUPS for path in sorted((CONF / group).glob("*.yaml"))]
# building these allocates hundreds of millions of parameters: their sizes are checked on the meta device
LARGE = {("model", "dit_l"), ("model", "dit_xl"), ("model", "unet_sd"), ("model", "unet_sd2"), ("model", "dit_b"),
         ("autoencoder", "sd_vae"), ("autoencoder", "sdxl_vae"), ("autoencoder", "sd3_vae"),
         ("autoencoder", "flux_vae")}

# presets that start from published weights: the keys they leave for the user to give
NEEDS = {("experiment", "dit_xl2_256"): ["dit_weights=/weights/dit.pt", "vae_weights=/weights/vae"],
         ("experiment", "sd15_finetune"): ["pretrained_dir=/weights/sd15"]}


def test_every_group_has_options():
    for group in GROUPS:
        assert any((CONF / group).glob("*.yaml")), f"conf/{group} is empty"


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_option_composes(group, option, tmp_path):
    cfg = compose_config([f"{group}={option}", *NEEDS.get((group, option), [])], tmp_path)
    resolved = OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    assert resolved["paths"]["output_dir"] == str(tmp_path)
    # pretrained text towers need their weight files; they are built in tests/test_text.py
    buildable = {"schedule", "sampler", "conditioner", "model"}
    needs_weights = ("clip_text", "class_text", "sd15_text", "sd2_text")
    if group in buildable and (group, option) not in LARGE and option not in needs_weights:
        assert hydra.utils.instantiate(cfg[group]) is not None


def test_sample_config_composes(tmp_path):
    cfg = compose_config(["run=" + str(tmp_path), "sampler=dpmpp_2m", "guidance=3"], name="sample")
    assert cfg.sampler._target_ == "ldm.samplers.DPMSolverPP2M"
    assert cfg.guidance._target_ == "ldm.guidance.CFG" and cfg.guidance.scale == 3  # guidance=G: the CFG scale


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_option_has_only_known_keys(group, option):
    assert config_errors(compose_config([f"{group}={option}"])) == []


def test_stage_one_task_composes_on_its_own():
    cfg = compose_config(["task=autoencoder"])
    assert cfg.task == "autoencoder"
    assert cfg.autoencoder.weights is None  # a fresh KL-VAE, not the shipped one
    assert "reconstructions" in cfg.callbacks and "sample_grid" not in cfg.callbacks
    assert config_errors(cfg) == []
    assert check_keys(cfg.vae, AutoencoderTraining, "vae", passed_by_code=["autoencoder"]) == []


@pytest.mark.parametrize("group", ["model", "autoencoder"])
def test_presets_state_only_what_differs_from_their_base(group):
    """A preset inherits through its defaults list: it repeats no value of its base, and two options with
    the same _target_ are one base and its presets."""
    files = {path.stem: yaml.safe_load(path.read_text()) for path in sorted((CONF / group).glob("*.yaml"))}
    bases = {name: node for name, node in files.items() if "defaults" not in node}
    assert len({node["_target_"] for node in bases.values()}) == len(bases), f"copied presets in conf/{group}"
    for name, node in files.items():
        if name in bases:
            continue
        [base] = [entry for entry in node["defaults"] if entry != "_self_"]
        repeated = {key for key, value in node.items() if key != "defaults" and bases[base].get(key) == value}
        assert not repeated, f"conf/{group}/{name}.yaml repeats {sorted(repeated)} of {base}.yaml"


def test_image_size_the_autoencoder_cannot_divide_is_named_once_for_both_checks():
    message = r"data.image_size=30 is not divisible .* \(autoencoder.downsample=4\): use a multiple of 4, e.g. 28 or 32"
    cfg = compose_config(["data.image_size=30"])
    with pytest.raises(Exception, match=message):
        OmegaConf.to_container(cfg.model, resolve=True)
    with pytest.raises(ValueError, match=message):
        hydra.utils.instantiate(cfg.autoencoder).latent_shape(30)


def test_a_moved_key_names_its_new_spelling():
    from conftest import run_script

    with pytest.raises(AssertionError, match=r"diffusion.lr is now optimizer.lr: write optimizer.lr=0.001"):
        run_script("train.py", "diffusion.lr=0.001")
