"""Guidance (config group `guidance`): classifier-free, autoguidance and classifier guidance, in an interval of
noise levels; each wraps the network into a sampler's model_fn through the schedule's contract."""

from ldm.guidance.classifier import classifier_shift, log_likelihood_gradient, shift_by_gradient
from ldm.guidance.combine import batched_pair, classifier_free_guidance, guided_model_fn, rescale_to_std
from ldm.guidance.guidance import Guidance, as_guidance
from ldm.guidance.interval import NoiseInterval, noise_level
from ldm.guidance.spec import CFG, KINDS, Auto, Classifier

__all__ = ["CFG", "KINDS", "Auto", "Classifier", "Guidance", "NoiseInterval", "as_guidance", "batched_pair",
           "classifier_free_guidance", "classifier_shift", "guided_model_fn", "log_likelihood_gradient", "noise_level",
           "rescale_to_std", "shift_by_gradient"]
