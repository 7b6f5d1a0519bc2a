"""Sample from a trained run: python sample.py run=DIR n=N sampler=NAME steps=K guidance=G out=FILE.npz"""

import hydra
from omegaconf import DictConfig

import ldm  # noqa: F401  (registers the config resolvers)
from ldm.sampling import sample


@hydra.main(version_base="1.3", config_path="conf", config_name="sample")
def main(cfg: DictConfig) -> None:
    sample(cfg)


if __name__ == "__main__":
    main()
