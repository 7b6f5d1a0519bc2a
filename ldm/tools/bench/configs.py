"""The project's own configs, composed with Hydra: what the bench builds is what a user's run builds."""

from __future__ import annotations

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from ldm.utils.config import CONF


def group_config(group: str, name: str, **values) -> DictConfig:
    """conf/<group>/<name>.yaml alone, with `values` in place of its interpolations into the train config."""
    folder = CONF / group
    if not (folder / f"{name}.yaml").is_file():
        known = sorted(p.stem for p in folder.glob("*.yaml"))
        raise ValueError(f"no config {group}={name} in {folder}; the configs are {known}")
    overrides = [f"{key}={'null' if value is None else value}" for key, value in values.items()]
    with initialize_config_dir(config_dir=str(folder), version_base="1.3"):
        return compose(name, overrides=overrides)


def train_config(overrides: list[str]) -> DictConfig:
    """conf/train.yaml with these overrides."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=overrides)
