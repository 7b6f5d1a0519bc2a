"""k-NN manifold metrics: precision and recall (Kynkäänniemi et al. 2019), density and coverage (Naeem et al. 2020).

Each real feature gets a ball reaching its k-th nearest other real feature; each generated one likewise
among the generated. precision: generated samples inside some real ball. recall: real samples inside
some generated ball. density: real balls containing a generated sample, per generated sample, / k.
coverage: real balls that contain some generated sample. "Inside" includes the boundary (<=), as in
the published definition. Distances are taken in float64, `chunk` rows at a time.
"""

from __future__ import annotations

import torch

NEAREST_K = 3


def knn_radii(features: torch.Tensor, k: int = NEAREST_K, chunk: int = 2048) -> torch.Tensor:
    """(N,) distance of each feature to its k-th nearest other feature of the same set."""
    if len(features) <= k:
        raise ValueError(f"k-NN radii with k={k} need more than {k} samples, got {len(features)}")
    features = features.double()
    # the (k + 1)-th smallest distance: the smallest is the feature to itself
    return torch.cat([torch.cdist(block, features).kthvalue(k + 1, dim=1).values for block in features.split(chunk)])


def manifold_metrics(real: torch.Tensor, fake: torch.Tensor, k: int = NEAREST_K, chunk: int = 2048
                     ) -> dict[str, float]:
    """precision, recall, density and coverage of `fake` (N, D) against `real` (M, D)."""
    real, fake = real.double(), fake.double()
    real_radii, fake_radii = knn_radii(real, k, chunk), knn_radii(fake, k, chunk)
    in_real_ball = torch.zeros(len(fake), dtype=torch.bool, device=fake.device)
    real_balls_hit = torch.zeros(len(fake), dtype=torch.float64, device=fake.device)
    recalled = covered = 0
    for start in range(0, len(real), chunk):
        distances = torch.cdist(real[start:start + chunk], fake)  # (chunk, N)
        inside = distances <= real_radii[start:start + chunk, None]
        in_real_ball |= inside.any(dim=0)
        real_balls_hit += inside.sum(dim=0)
        covered += int(inside.any(dim=1).sum())
        recalled += int((distances <= fake_radii[None]).any(dim=1).sum())
    return {"precision": float(in_real_ball.double().mean()), "recall": recalled / len(real),
            "density": float(real_balls_hit.mean()) / k, "coverage": covered / len(real)}
