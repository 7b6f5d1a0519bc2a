"""Train: python train.py [group=option ...] [key=value ...] (see conf/train.yaml)."""

import sys

import hydra
from omegaconf import DictConfig

import ldm  # noqa: F401  (registers the config resolvers)
from ldm.checks.hydra import created_run_dir
from ldm.checks.overrides import override_problems
from ldm.run.renamed import guidance_arguments, renamed_overrides
from ldm.utils.errors import ConfigError, exit_for, reported_user_errors


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    # deferred: torch and Lightning load only once Hydra has parsed the arguments (`--help` stays quick)
    from ldm.commands.train import train

    with reported_user_errors(created_run_dir()):
        return train(cfg)


if __name__ == "__main__":
    sys.argv[1:], problems = guidance_arguments(sys.argv[1:])  # guidance=G is guidance.scale=G
    if problems := renamed_overrides(sys.argv[1:]) + problems or override_problems(sys.argv[1:], "train"):
        exit_for(ConfigError(problems))
    main()
