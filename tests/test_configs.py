"""Every option of every config group composes, resolves and (where cheap) instantiates."""

from __future__ import annotations

import hydra
import pytest
from conftest import CONF, compose_config
from omegaconf import OmegaConf

GROUPS = ["data", "autoencoder", "conditioner", "model", "schedule", "sampler", "trainer", "callbacks", "logger",
          "experiment", "hparams_search", "launcher", "debug"]
OPTIONS = [(group, path.stem) for group in GROUPS for path in sorted((CONF / group).glob("*.yaml"))]
# building these allocates hundreds of millions of parameters: their sizes are checked on the meta device
LARGE = {("model", "dit_l"), ("model", "dit_xl"), ("model", "unet_sd"), ("model", "dit_b")}


def test_every_group_has_options():
    for group in GROUPS:
        assert any((CONF / group).glob("*.yaml")), f"conf/{group} is empty"


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_option_composes(group, option, tmp_path):
    cfg = compose_config([f"{group}={option}"], tmp_path)
    resolved = OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    assert resolved["paths"]["output_dir"] == str(tmp_path)
    # pretrained text towers need their weight files; they are built in tests/test_text.py
    buildable = {"schedule", "sampler", "conditioner", "model"}
    if group in buildable and (group, option) not in LARGE and option not in ("clip_text", "class_text"):
        assert hydra.utils.instantiate(cfg[group]) is not None


def test_sample_config_composes(tmp_path):
    cfg = compose_config(["run=" + str(tmp_path), "sampler=dpmpp_2m", "guidance=3"], name="sample")
    assert cfg.sampler._target_ == "ldm.samplers.DPMSolverPP2M"
    assert cfg.guidance == 3
