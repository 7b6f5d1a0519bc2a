"""Reconstruct a post-hoc EMA: python -m ldm.ema run=DIR sigma_rel=0.08 (see conf/ema.yaml)."""

import hydra
from omegaconf import DictConfig

import ldm  # noqa: F401  (registers the config resolvers)
from ldm.utils.config import CONF
from ldm.utils.errors import reported_user_errors


@hydra.main(version_base="1.3", config_path=str(CONF), config_name="ema")
def main(cfg: DictConfig) -> None:
    # deferred: torch loads only once Hydra has parsed the arguments (`--help` stays quick)
    from ldm.commands.ema import reconstruct_ema

    with reported_user_errors():
        reconstruct_ema(cfg)


if __name__ == "__main__":
    main()
