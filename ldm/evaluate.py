"""`evaluate(cfg)`: score a run's samples (or a sample file, or real images) with the configured metric suite.

    python evaluate.py run=DIR [sampler=heun steps=10 guidance=2 n=1000]    (conf/evaluate.yaml)

Samples come from the run's EMA weights through `trainer.predict`, split over devices; sample i is drawn from
seed (seed, i), so the numbers do not depend on the batch size or the number of devices (ldm.evaluation.draw).
The metrics (ldm.metrics) compare them with cached statistics of the run's real images. `metrics.json` in the
output directory holds the numbers and their provenance; a wandb run in the training run's group holds them too.

`python -m ldm.evaluate FILE.npz` is the older per-data-set check of a sample file: the digits classifier's
agreement with the labels, or the shapes' color and position judged from pixels.
"""

from __future__ import annotations

import argparse
import logging

import numpy as np

from ldm.evaluation import digits, shapes

log = logging.getLogger(__name__)


def evaluate(cfg) -> dict[str, float]:
    """Run the evaluation `cfg` (conf/evaluate.yaml) describes; returns the metrics (on every rank)."""
    from ldm.evaluation.checks import check_evaluation
    from ldm.evaluation.scoring import score_real, score_run, score_samples_file

    check_evaluation(cfg)
    if cfg.samples is not None:
        return score_samples_file(cfg)
    if cfg.real is not None:
        return score_real(cfg)
    return score_run(cfg)


def evaluate_file(path: str) -> dict[str, float]:
    samples = np.load(path, allow_pickle=False)
    if "prompts" in samples:
        return shapes.evaluate_samples(samples)
    if "labels" in samples:
        return digits.evaluate_samples(samples, name=path)
    raise ValueError(f"{path} holds neither `prompts` nor `labels` (it has {sorted(samples.files)}): "
                     f"give a sample file written by sample.py")


def main() -> None:
    parser = argparse.ArgumentParser(description="Score a sample file of sample.py with the data set's own check")
    parser.add_argument("npz", nargs="?", help="samples written by sample.py")
    parser.add_argument("--reference", action="store_true", help="also score the real validation digits")
    args = parser.parse_args()
    if args.reference or not args.npz:
        print(f"real validation digits: accuracy {digits.real_digits_accuracy():.4f}")
    if args.npz:
        for key, value in evaluate_file(args.npz).items():
            print(f"{key}: {value:.4f}" if isinstance(value, float) else f"{key}: {value}")


if __name__ == "__main__":
    main()
