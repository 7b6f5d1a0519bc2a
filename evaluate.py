"""Evaluate a run: python evaluate.py run=DIR [n=N] [sampler=NAME] [steps=K] [guidance=G] (see conf/evaluate.yaml)."""

import hydra
from omegaconf import DictConfig

import ldm  # noqa: F401  (registers the config resolvers)
from ldm import hydra_hooks
from ldm.errors import reported_user_errors


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> float | None:
    # heavy imports (torch, Lightning) only once Hydra has parsed the arguments
    from ldm.evaluate import evaluate
    from ldm.evaluation.checks import check_evaluation

    with reported_user_errors(hydra_hooks.new_run_dir):
        if not hydra_hooks.checked:  # the Hydra callback was switched off: check here instead
            check_evaluation(cfg)
        scores = evaluate(cfg)
        return next(iter(scores.values()), None)  # the first metric (fd_*), for a sweeper


if __name__ == "__main__":
    main()
