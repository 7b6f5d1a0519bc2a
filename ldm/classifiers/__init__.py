"""Noise-conditional classifiers of latents (config group `classifier`), trained by `task=classifier` for
classifier guidance."""

from ldm.classifiers.encoder import NoisyClassifier

__all__ = ["NoisyClassifier"]
