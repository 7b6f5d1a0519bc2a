"""Sample from a trained run: python sample.py run=DIR n=N sampler=NAME steps=K guidance=G out=FILE.npz"""

import hydra
from omegaconf import DictConfig

import ldm  # noqa: F401  (registers the config resolvers)
from ldm import hydra_hooks
from ldm.errors import reported_user_errors


@hydra.main(version_base="1.3", config_path="conf", config_name="sample")
def main(cfg: DictConfig) -> None:
    # heavy imports (torch) only once Hydra has parsed the arguments
    from ldm.sample_checks import check_sampling
    from ldm.sampling import sample

    with reported_user_errors():
        if not hydra_hooks.checked:  # the Hydra callback was switched off: check here instead
            check_sampling(cfg)
        sample(cfg)


if __name__ == "__main__":
    main()
