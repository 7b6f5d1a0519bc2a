"""Evaluate a run: python evaluate.py run=DIR [n=N] [sampler=NAME] [steps=K] [guidance=G] (see conf/evaluate.yaml)."""

import sys

import hydra
from omegaconf import DictConfig

import ldm  # noqa: F401  (registers the config resolvers)
from ldm.checks.hydra import created_run_dir
from ldm.checks.overrides import override_problems
from ldm.run.renamed import guidance_arguments
from ldm.utils.errors import ConfigError, exit_for, reported_user_errors


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> float | None:
    # deferred: torch and Lightning load only once Hydra has parsed the arguments (`--help` stays quick)
    from ldm.commands.evaluate import evaluate

    with reported_user_errors(created_run_dir()):
        scores = evaluate(cfg)
        return next(iter(scores.values()), None)  # the first metric (fd_*), for a sweeper


if __name__ == "__main__":
    sys.argv[1:], problems = guidance_arguments(sys.argv[1:])  # guidance=G is guidance.scale=G
    if problems := problems or override_problems(sys.argv[1:], "evaluate"):
        exit_for(ConfigError(problems))
    main()
