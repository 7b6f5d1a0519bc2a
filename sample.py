"""Sample from a trained run: python sample.py run=DIR n=N sampler=NAME steps=K guidance=G out=FILE.npz"""

import sys

import hydra
from omegaconf import DictConfig

import ldm  # noqa: F401  (registers the config resolvers)
from ldm.checks.overrides import override_problems
from ldm.run.renamed import guidance_arguments
from ldm.utils.errors import ConfigError, exit_for, reported_user_errors


@hydra.main(version_base="1.3", config_path="conf", config_name="sample")
def main(cfg: DictConfig) -> None:
    # deferred: torch loads only once Hydra has parsed the arguments (`--help` stays quick)
    from ldm.commands.sample import sample

    with reported_user_errors():
        sample(cfg)


if __name__ == "__main__":
    sys.argv[1:], problems = guidance_arguments(sys.argv[1:])  # guidance=G is guidance.scale=G
    if problems := problems or override_problems(sys.argv[1:], "sample"):
        exit_for(ConfigError(problems))
    main()
