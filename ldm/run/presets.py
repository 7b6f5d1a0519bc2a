"""A model from an experiment preset and weight files, without a training run directory.

`sample.py preset=dit_xl2_256 preset_overrides="['dit_weights=DiT-XL-2-256x256.pt','vae_weights=VAE']"` composes
the training config `conf/train.yaml` with `experiment=NAME` and the overrides, the way `train.py` would,
and builds the model from the weights the config names (no checkpoint). The presets are the project's
own files, so nothing in them needs the run-directory allow-list.
"""

from __future__ import annotations

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ldm.utils.config import CONF
from ldm.utils.errors import ConfigError


def preset_names() -> list[str]:
    return sorted(path.stem for path in (CONF / "experiment").glob("*.yaml"))


def preset_config(experiment: str, overrides: list[str] | None = None) -> DictConfig:
    """The composed training config of `experiment=NAME` with `overrides` (`key=value` strings)."""

    if experiment not in preset_names():
        raise ConfigError([f"preset={experiment}: no such experiment; the presets are {', '.join(preset_names())}"])
    overrides = [f"experiment={experiment}", *[str(item) for item in overrides or []]]
    try:
        if GlobalHydra.instance().is_initialized():  # inside sample.py's own Hydra app: same config directory
            return compose(config_name="train", overrides=overrides)
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            return compose(config_name="train", overrides=overrides)
    except (HydraException, OmegaConfBaseException) as error:
        raise ConfigError([f"preset={experiment} preset_overrides={overrides[1:]}: {error}"]) from error


def missing_values(cfg: DictConfig) -> list[str]:
    """Keys left `???` in a composed config (e.g. the weights a preset needs), as dotted names."""
    missing = []

    def walk(node, prefix: str) -> None:
        items = node.items_ex(resolve=False) if isinstance(node, DictConfig) else enumerate(node)
        for key, _ in items:
            name = f"{prefix}{key}"
            if OmegaConf.is_missing(node, key):
                missing.append(name)
            else:
                child = node._get_node(key)
                if OmegaConf.is_config(child):
                    walk(child, name + ".")

    walk(cfg, "")
    return [name for name in missing if not name.startswith("hydra.")]
