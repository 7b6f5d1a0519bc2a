"""Prompt following judged by a project feature network's heads: how often each asked-for attribute is shown."""

from __future__ import annotations

import torch
from torchmetrics import Metric


class AttributeAccuracy(Metric):
    """Per attribute, the share of samples whose predicted class is the asked one (target -1: not asked, skipped);
    `all`: samples whose every asked attribute is right; `samples`: how many were scored."""

    full_state_update = False
    higher_is_better = True

    def __init__(self, attributes: list[str], **kwargs):
        super().__init__(**kwargs)
        self.attributes = list(attributes)
        self.add_state("correct", default=torch.zeros(len(self.attributes), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("asked", default=torch.zeros(len(self.attributes), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("all_correct", default=torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("samples", default=torch.tensor(0), dist_reduce_fx="sum")

    def update(self, logits: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> None:
        every = None
        for i, name in enumerate(self.attributes):
            target = targets[name].to(self.correct.device)
            asked = target >= 0
            right = (logits[name].argmax(dim=-1).to(target.device) == target) & asked
            self.correct[i] += right.sum()
            self.asked[i] += asked.sum()
            every = (right | ~asked) if every is None else every & (right | ~asked)
        self.all_correct += every.sum()
        self.samples += len(every)

    def compute(self) -> dict[str, torch.Tensor]:
        scores = {name: self.correct[i] / self.asked[i].clamp(min=1) for i, name in enumerate(self.attributes)}
        return {**scores, "all": self.all_correct / self.samples.clamp(min=1), "samples": self.samples}
