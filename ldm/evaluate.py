"""The project's own sample metrics: `python -m ldm.evaluate FILE.npz`.

The file's content picks the evaluation: `prompts` -> captioned shapes (ldm.evaluation.shapes),
`labels` -> digits (ldm.evaluation.digits).
"""

from __future__ import annotations

import argparse

import numpy as np

from ldm.evaluation import digits, shapes


def evaluate_file(path: str) -> dict[str, float]:
    samples = np.load(path, allow_pickle=False)
    if "prompts" in samples:
        return shapes.evaluate_samples(samples)
    if "labels" in samples:
        return digits.evaluate_samples(samples, name=path)
    raise ValueError(f"{path} holds neither `prompts` nor `labels` (it has {sorted(samples.files)}): "
                     f"give a sample file written by sample.py")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
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
