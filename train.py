"""Train: python train.py [group=option ...] [key=value ...] (see conf/train.yaml)."""

import sys

import hydra
from omegaconf import DictConfig

import ldm  # noqa: F401  (registers the config resolvers)
from ldm.renamed import renamed_overrides
from ldm.training import train


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    return train(cfg)


if __name__ == "__main__":
    if moved := renamed_overrides(sys.argv[1:]):
        sys.exit("\n".join(moved))
    main()
