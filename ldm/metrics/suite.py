"""One object for evaluation: features extracted once per batch, every configured metric, and their provenance.

    suite = build_suite(backend="digits")                 # or hydra.utils.instantiate(cfg.metrics)
    suite.set_reference(suite.load_reference(val_set, "val", data_config))   # or suite.update(real, real=True)
    suite.update(samples, real=False, labels=labels)      # images: float [-1, 1] (N, C, H, W) or uint8 (N, H, W, C)
    suite.compute()  # {"fd_digits": ..., "kid_digits": ..., "precision_digits": ..., ...}; suite.provenance()

Names say which features a number was measured with: `fid` and `kid` only with the published Inception
weights, otherwise `fd_<backend>`, `kid_<backend>`, `precision_<backend>`, .... All states are torchmetrics
states, so under DDP each rank updates with its own samples and `compute` gives every rank the total.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from ldm.metrics.attributes import AttributeAccuracy
from ldm.metrics.clip import ClipFeatures
from ldm.metrics.clip_score import ClipScore
from ldm.metrics.dinov2 import DinoV2Features
from ldm.metrics.features import FeatureBackend, unit_images
from ldm.metrics.frechet import compute_with_reference, frechet_metric
from ldm.metrics.inception import InceptionFeatures
from ldm.metrics.kept_features import KeptFeatures
from ldm.metrics.kid import kernel_distance
from ldm.metrics.precision_recall import NEAREST_K, manifold_metrics
from ldm.metrics.project_features import ProjectFeatures
from ldm.metrics.reference import Reference, load_or_compute_reference
from ldm.utils.errors import ConfigError, UserError

METRICS = ("fd", "kid", "precision_recall", "density_coverage", "clip_score", "accuracy")
BACKENDS = ("digits", "shapes", "inception", "dinov2", "clip")
KEPT_FOR = {"kid", "precision_recall", "density_coverage"}


class MetricSuite(nn.Module):
    """The configured `metrics` (names in METRICS) of generated images against real ones, on `backend`'s features."""

    def __init__(self, backend: FeatureBackend, metrics: Sequence[str] = ("fd", "kid", "precision_recall"),
                 kid_subsets: int = 100, kid_subset_size: int = 1000, nearest_k: int = NEAREST_K,
                 max_features: int = 10_000, seed: int = 0, cache_dir: str | Path | None = None):
        super().__init__()
        self.metrics = list(metrics)
        problems = [f"metrics.metrics: unknown metric '{name}'; choose from {', '.join(METRICS)}"
                    for name in self.metrics if name not in METRICS]
        if "clip_score" in self.metrics and not backend.encodes_text:
            problems.append(f"metrics.metrics: clip_score needs caption embeddings, which "
                            f"metrics.backend={backend.name} has not: use metrics.backend=clip (or shapes)")
        if "accuracy" in self.metrics and not hasattr(backend, "classify"):
            problems.append(f"metrics.metrics: accuracy needs a classifier, which metrics.backend={backend.name} has "
                            "not: use the data set's own backend (digits, shapes)")
        if problems:
            raise ConfigError(problems)
        self.backend = backend
        self.kid_subsets, self.kid_subset_size, self.nearest_k = kid_subsets, kid_subset_size, nearest_k
        self.max_features, self.seed, self.cache_dir = max_features, seed, cache_dir
        self.reference: Reference | None = None
        self.frechet = frechet_metric(backend.feature_dim) if "fd" in self.metrics else None
        self.kept = KeptFeatures(max_features if KEPT_FOR & set(self.metrics) else 0)
        self.clip_score = ClipScore() if "clip_score" in self.metrics else None
        self.accuracy = AttributeAccuracy(list(backend.heads)) if "accuracy" in self.metrics else None
        self._counts: dict[str, int] = {}

    def metric_name(self, base: str) -> str:
        """`fd` -> `fid` with the published Inception weights, `fd_<backend>` with any other features."""
        if self.backend.published:
            return {"fd": "fid"}.get(base, base)
        return f"{base}_{self.backend.name}"

    def set_reference(self, reference: Reference) -> None:
        """Take the real side from cached statistics instead of `update(images, real=True)`."""
        if reference.mean.shape != (self.backend.feature_dim,):
            raise ValueError(f"the reference has {tuple(reference.mean.shape)} features, the {self.backend.name} "
                             f"backend gives {self.backend.feature_dim}")
        self.reference = reference
        self.kept.reference = reference.features[: self.kept.max_per_rank]

    def load_reference(self, dataset, split: str, data_config: dict, batch_size: int = 256) -> Reference:
        """The reference of `dataset` from `cache_dir` (computed and written on first use)."""
        if self.cache_dir is None:
            raise UserError("the metric suite has no cache_dir for reference statistics: set metrics.cache_dir")
        return load_or_compute_reference(self.backend, dataset, split, data_config, self.cache_dir, self.max_features,
                                         self.seed, batch_size, next(self.backend.parameters()).device)

    @torch.no_grad()
    def update(self, images, real: bool, labels=None, captions: Sequence[str] | None = None) -> None:
        """Add a batch; for generated images, `labels` or `captions` say what was asked (accuracy, CLIP score)."""
        if real and self.reference is not None:
            raise UserError("the real side comes from the reference statistics already: update with real=False only")
        images = unit_images(images).to(next(self.backend.parameters()).device)
        features = self.backend(images)
        if self.frechet is not None:
            self.frechet.update(features, real=real)
        self.kept.update(features, real)
        if real:
            return
        if self.clip_score is not None and captions is not None:
            self.clip_score.update(*self.backend.text_alignment(images, features, captions))
        if self.accuracy is not None:
            targets = self.backend.targets(labels=labels, captions=captions)
            if targets is not None:
                self.accuracy.update(self.backend.classify(images), targets)

    def compute(self) -> dict[str, float]:
        """Every configured metric over all ranks' samples; the same on every rank."""
        kept = self.kept.compute()
        num_real = int(kept["num_real"]) + (self.reference.count if self.reference is not None else 0)
        self._counts = {"num_real": num_real, "num_fake": int(kept["num_fake"])}
        if num_real < 2 or self._counts["num_fake"] < 2:
            raise UserError(f"metrics need at least 2 real and 2 generated images, got {num_real} and "
                            f"{self._counts['num_fake']}: update with real=True (or set a reference) and real=False")
        out = {}
        if self.frechet is not None:
            value = self.frechet.compute() if self.reference is None else compute_with_reference(
                self.frechet, self.reference.mean, self.reference.cov, self.reference.count)
            out[self.metric_name("fd")] = float(value)
        real, fake = self._subset(kept["real"]), self._subset(kept["fake"])
        if "kid" in self.metrics:
            mean, std, size = kernel_distance(real, fake, self.kid_subsets, self.kid_subset_size, self.seed)
            out[self.metric_name("kid")], out[self.metric_name("kid") + "_std"] = mean, std
            self._counts["kid_subset_size"] = size
        if {"precision_recall", "density_coverage"} & set(self.metrics):
            scores = manifold_metrics(real, fake, self.nearest_k)
            names = [*(("precision", "recall") if "precision_recall" in self.metrics else ()),
                     *(("density", "coverage") if "density_coverage" in self.metrics else ())]
            out.update({self.metric_name(name): scores[name] for name in names})
            self._counts["knn_real"], self._counts["knn_fake"] = len(real), len(fake)
        if self.clip_score is not None:
            name = "clip_score" if self.backend.name == "clip" else self.metric_name("clip_score")
            out[name] = float(self.clip_score.compute())
            if out[name] != out[name]:  # NaN: no rank had a caption
                raise UserError("clip_score needs the caption each generated image was made from: "
                                "pass captions to update()")
        if self.accuracy is not None:
            scores = self.accuracy.compute()
            if int(scores["samples"]) == 0:
                raise UserError("accuracy needs what each generated image was asked to show: pass labels (digits) "
                                "or captions (shapes) to update()")
            out[f"accuracy_{self.backend.name}"] = float(scores["all"])
            if len(self.accuracy.attributes) > 1:
                out.update({f"accuracy_{self.backend.name}_{name}": float(scores[name])
                            for name in self.accuracy.attributes})
        return out

    def _subset(self, features: torch.Tensor) -> torch.Tensor:
        """At most max_features rows, the same seeded choice on every rank."""
        if len(features) <= self.max_features:
            return features
        order = torch.randperm(len(features), generator=torch.Generator().manual_seed(self.seed))
        return features[order[: self.max_features].to(features.device)]

    def provenance(self) -> dict:
        """What the numbers were measured with: features, weights hash, settings, samples of the last compute."""
        return {**self.backend.provenance(), "published": self.backend.published, "metrics": self.metrics,
                "reference": self.reference.key if self.reference is not None else None,
                "kid_subsets": self.kid_subsets, "nearest_k": self.nearest_k, "max_features": self.max_features,
                "seed": self.seed, **self._counts}

    def reset(self) -> None:
        """Forget the samples seen (a reference stays)."""
        for metric in (self.frechet, self.kept, self.clip_score, self.accuracy):
            if metric is not None:
                metric.reset()
        self._counts = {}


def build_backend(backend: str = "digits", weights: dict | None = None, clip_model: str = "ViT-B-32",
                  dinov2_image_size: int = 224) -> FeatureBackend:
    """The feature network named by `metrics.backend`, from `metrics.weights.<backend>` (shipped ones when unset)."""
    path = (weights or {}).get(backend)
    if backend in ("digits", "shapes"):
        return ProjectFeatures(backend, path)
    if backend == "inception":
        return InceptionFeatures(path)
    if backend == "dinov2":
        return DinoV2Features(path, image_size=dinov2_image_size)
    if backend == "clip":
        return ClipFeatures(path, model_name=clip_model)
    raise ConfigError([f"metrics.backend={backend}: unknown feature network; choose one of {', '.join(BACKENDS)}"])


def build_suite(backend: str = "digits", metrics: Sequence[str] = ("fd", "kid", "precision_recall"),
                weights: dict | None = None, clip_model: str = "ViT-B-32", dinov2_image_size: int = 224,
                kid_subsets: int = 100, kid_subset_size: int = 1000, nearest_k: int = NEAREST_K,
                max_features: int = 10_000, seed: int = 0, cache_dir: str | None = None) -> MetricSuite:
    """A MetricSuite from the `metrics` config group (conf/metrics/)."""
    network = build_backend(backend, dict(weights or {}), clip_model, dinov2_image_size)
    return MetricSuite(network, list(metrics), kid_subsets, kid_subset_size, nearest_k, max_features, seed, cache_dir)
