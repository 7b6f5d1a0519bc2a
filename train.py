"""Train: python train.py [group=option ...] [key=value ...] (see conf/train.yaml)."""

import sys

import hydra
from omegaconf import DictConfig

import ldm  # noqa: F401  (registers the config resolvers)
from ldm import hydra_hooks
from ldm.errors import ConfigError, exit_for, reported_user_errors
from ldm.renamed import renamed_overrides


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    # heavy imports (torch, Lightning) only once Hydra has parsed the arguments
    from ldm.checks import check_training
    from ldm.training import train

    with reported_user_errors(hydra_hooks.new_run_dir):
        if not hydra_hooks.checked:  # the Hydra callback was switched off: check here instead
            check_training(cfg)
        return train(cfg)


if __name__ == "__main__":
    if moved := renamed_overrides(sys.argv[1:]):
        exit_for(ConfigError(moved))
    main()
