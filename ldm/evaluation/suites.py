"""The metric suite of a run: the `metrics` config of its data set, with the real side from cached reference statistics.

The data sets with a feature network of their own choose it by default (digits -> `metrics=digits`,
shapes -> `metrics=shapes`); any other data needs `metrics=` (inception, dinov2, clip) with its weights.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import hydra
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ldm.data.cache import data_identity
from ldm.utils.config import CONF
from ldm.utils.errors import ConfigError

log = logging.getLogger(__name__)

#: the data sets whose own metrics config (conf/metrics/NAME.yaml) is the default, by their dataset class
DATA_METRICS = {"ldm.data.digits.DigitsDataset": "digits", "ldm.data.shapes.ShapesDataset": "shapes"}
SPLITS = ("train", "val")
#: metrics that score what each sample was asked for, and the condition they need
CONDITIONAL_METRICS = {"accuracy": ("label", "caption"), "clip_score": ("caption",)}


def metrics_option(data_cfg: DictConfig) -> str | None:
    """The conf/metrics option of a run's data set (digits, shapes), None for data without one."""
    return DATA_METRICS.get(OmegaConf.select(data_cfg, "train._target_"))


def dataset_metrics_option(dataset) -> str | None:
    """The conf/metrics option of a data set object (a cached split: of the data set it wraps)."""
    base = getattr(dataset, "base", dataset)
    return DATA_METRICS.get(f"{type(base).__module__}.{type(base).__qualname__}")


def compose(config_name: str, overrides: Sequence[str] = ()) -> DictConfig:
    """A config of this project's conf/ composed with `overrides`, inside a running Hydra app or not."""

    try:
        if GlobalHydra.instance().is_initialized():  # inside a Hydra app of this project: the same conf/
            return hydra_compose(config_name=config_name, overrides=list(overrides))
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            return hydra_compose(config_name=config_name, overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as error:
        raise ConfigError([f"{config_name} {list(overrides)}: {error}"]) from error


def options(group: str) -> list[str]:
    return sorted(path.stem for path in (CONF / group).glob("*.yaml"))


def compose_metrics(option: str, root_dir: str = "${ldm_root:}", overrides: Sequence[str] = ()) -> DictConfig:
    """conf/metrics/OPTION.yaml as `metrics=OPTION` composes it (with `metrics.key=value` overrides), resolved."""
    if option not in options("metrics"):
        raise ConfigError([f"metrics={option}: no such metrics config; choose one of {', '.join(options('metrics'))}"])
    cfg = compose(f"metrics/{option}", overrides)
    OmegaConf.set_struct(cfg, False)
    cfg.paths = {"root_dir": root_dir}
    return OmegaConf.create(OmegaConf.to_container(cfg.metrics, resolve=True))


def compose_data(option: str) -> DictConfig:
    """The `data` node of the training config with `data=OPTION` (for scoring files without a run)."""
    if option not in options("data"):
        raise ConfigError([f"data={option}: no such data config; choose one of {', '.join(options('data'))}"])
    return compose("train", [f"data={option}"]).data


def metrics_for(data_cfg: DictConfig, metrics_cfg: DictConfig | None, root_dir: str = "${ldm_root:}",
                overrides: Sequence[str] = ()) -> DictConfig:
    """The given metrics config, or the data set's own with `overrides` (`metrics.key=value`)."""
    if metrics_cfg is not None:
        if overrides:
            raise ConfigError([f"metrics_overrides={list(overrides)}: with metrics= chosen, set its keys directly, "
                               "e.g. metrics.kid_subsets=20"])
        return metrics_cfg
    option = metrics_option(data_cfg)
    if option is None:
        raise ConfigError([f"metrics: the data set {OmegaConf.select(data_cfg, 'train._target_')} has no feature "
                           "network of its own; choose one, e.g. metrics=inception "
                           "metrics.weights.inception=/path/to/pt_inception-2015-12-05-6726825d.pth"])
    return compose_metrics(option, root_dir, overrides)


def build_run_suite(metrics_cfg: DictConfig, input_keys: Sequence[str]):
    """The suite of `metrics_cfg`, without the metrics that need a condition the run does not take."""
    metrics_cfg = OmegaConf.create(OmegaConf.to_container(metrics_cfg, resolve=True))
    kept = []
    for name in metrics_cfg.metrics:
        if name in CONDITIONAL_METRICS and not set(CONDITIONAL_METRICS[name]) & set(input_keys):
            log.warning("metrics: %s left out: the run takes no %s", name, " or ".join(CONDITIONAL_METRICS[name]))
        else:
            kept.append(name)
    metrics_cfg.metrics = kept
    return hydra.utils.instantiate(metrics_cfg)


def reference_dataset(data_cfg: DictConfig, split: str):
    """The run's `split` data set (images in [-1, 1]) that the samples are compared with."""
    if split not in SPLITS:
        raise ConfigError([f"reference={split}: choose one of the data splits {', '.join(SPLITS)}"])
    datamodule = hydra.utils.instantiate(data_cfg)
    return datamodule.train_set if split == "train" else datamodule.val_set


def set_reference(suite, data_cfg: DictConfig, split: str, dataset=None) -> None:
    """Give `suite` the cached statistics of the run's `split` (computed and stored on first use)."""
    dataset = dataset if dataset is not None else reference_dataset(data_cfg, split)
    suite.set_reference(suite.load_reference(dataset, split, data_identity(data_cfg)))


def split_captions(dataset, limit: int = 10_000) -> list[str] | None:
    """The captions of a data set's first `limit` items (without reading images where it can), or None."""
    base = getattr(dataset, "base", dataset)  # a cached split wraps the data set
    read = base.metadata if callable(getattr(base, "metadata", None)) else base.__getitem__
    if "caption" not in read(0):
        return None
    return [str(read(i)["caption"]) for i in range(min(limit, len(base)))]
