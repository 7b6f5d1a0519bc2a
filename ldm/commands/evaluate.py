"""`evaluate(cfg)`: score a run's samples (or a sample file, or real images) with the configured metric suite.

    python evaluate.py run=DIR [sampler=heun steps=10 guidance=2 n=1000]    (conf/evaluate.yaml)
    python evaluate.py samples=FILE.npz                                       (a file of sample.py)

Samples come from the run's EMA weights through `trainer.predict`, split over devices; sample i is drawn from
seed (seed, i), so the numbers do not depend on the batch size or the number of devices (ldm.evaluation.seeded).
The metrics (ldm.metrics) compare them with cached statistics of the run's real images. `metrics.json` in the
output directory holds the numbers and their provenance; a wandb run in the training run's group holds them too.
"""

from __future__ import annotations

from omegaconf import DictConfig

from ldm.checks.evaluation import check_evaluation
from ldm.checks.hydra import CheckEvaluationConfig, checked_by_hydra
from ldm.evaluation.scoring import score


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Run the evaluation `cfg` (conf/evaluate.yaml) describes; returns the metrics (on every rank)."""
    if not checked_by_hydra(CheckEvaluationConfig):
        check_evaluation(cfg)
    return score(cfg)
