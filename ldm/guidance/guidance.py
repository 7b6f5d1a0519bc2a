"""`Guidance`: what a sampler runs with, built once per command (ldm.run.guidance) and applied to any batch of
conditions by `model_fn(module, conditions)`."""

from __future__ import annotations

from torch import nn

from ldm.guidance.classifier import classifier_shift
from ldm.guidance.combine import ModelFn, batched_pair, guided_model_fn
from ldm.guidance.interval import NoiseInterval


class Guidance(nn.Module):
    """reference + scale * (cond - reference), then a classifier's score shift, inside `interval`.

    The reference is the unconditional prediction, or `weak`'s (a weaker model of the same latents and
    conditions: autoguidance). `classifier` (a module with `log_likelihood(labels)` and `label_key`) adds
    `classifier_scale` * grad log p(y | x_t). `sources` names the weaker model or classifier for the records.
    """

    def __init__(self, scale: float = 1.0, rescale: float = 0.0, interval: NoiseInterval | None = None,
                 weak: nn.Module | None = None, classifier: nn.Module | None = None, classifier_scale: float = 1.0,
                 sources: dict | None = None):
        super().__init__()
        if weak is not None and classifier is not None:
            raise ValueError("Guidance: a weaker model or a classifier, not both")
        self.scale, self.rescale, self.interval = float(scale), float(rescale), interval
        self.weak, self.classifier, self.classifier_scale = weak, classifier, float(classifier_scale)
        self.sources = dict(sources or {})

    @property
    def kind(self) -> str:
        return "auto" if self.weak is not None else "classifier" if self.classifier is not None else "cfg"

    def network_batches(self) -> int:
        """Batches through a network per sampler call: the model, the reference if guided, the classifier."""
        return 1 + (self.scale != 1.0) + (self.classifier is not None)

    def model_fn(self, module, conditions: dict) -> ModelFn:
        """model_fn(x_t, t) for `module` (predict, conditioner, schedule) and a batch of conditions."""
        self.to(module.device)
        cond = module.conditioner(conditions)

        def strong(x, t):
            return module.predict(x, t, cond)

        if self.weak is not None:
            weak_cond = self.weak.conditioner(conditions)

            def pair(x, t):
                return strong(x, t), self.weak.predict(x, t, weak_cond)
        else:
            pair = batched_pair(module.predict, cond, module.conditioner(conditions, force_drop=True))
        shift = None
        if self.classifier is not None:
            labels = conditions[self.classifier.label_key].to(module.device)
            shift = classifier_shift(module.schedule, self.classifier.log_likelihood(labels), self.classifier_scale)
        return guided_model_fn(strong, pair, module.schedule, self.scale, self.rescale, self.interval, shift)

    def record(self) -> dict:
        """What an evaluation's provenance says about it; `guidance` is the kind's own scale."""
        out = {"guidance_kind": self.kind, "guidance": self.scale, "guidance_rescale": self.rescale,
               "guidance_interval": None, **self.sources}
        if self.classifier is not None:
            out.update(guidance=self.classifier_scale, guidance_cfg_scale=self.scale)
        if self.interval is not None:
            out.update(self.interval.record())
        return out


def as_guidance(value: Guidance | float | None, default_scale: float) -> Guidance:
    """A `Guidance` as it is; a number as classifier-free guidance of that scale; None as `default_scale`."""
    if isinstance(value, Guidance):
        return value
    return Guidance(scale=default_scale if value is None else float(value))
