"""The `guidance` config group's options as plain settings (`_target_`s of conf/guidance/*.yaml).

They hold what the user asked for; `ldm.run.guidance` turns them into a `Guidance` once the run (and the weaker
model or the classifier they name) is loaded.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from ldm.guidance.interval import NoiseInterval


def _plain(values: Sequence[float] | None) -> list[float] | None:
    return None if values is None else [float(value) for value in values]


@dataclass
class _Interval:
    """`interval`: [sigma_lo, sigma_hi] in noise level sigma / alpha; `interval_t`: [t_lo, t_hi]; null: always."""

    def noise_interval(self) -> NoiseInterval | None:
        if self.interval is not None and self.interval_t is not None:
            raise ValueError("guidance.interval and guidance.interval_t: give one of them")
        if self.interval is not None:
            return NoiseInterval(*_plain(self.interval))
        if self.interval_t is not None:
            return NoiseInterval(*_plain(self.interval_t), in_t=True)
        return None


@dataclass
class CFG(_Interval):
    """Classifier-free guidance: uncond + scale * (cond - uncond); scale None: the run's diffusion.sample_guidance."""

    kind: ClassVar[str] = "cfg"
    scale: float | None = None
    rescale: float = 0.0
    interval: list[float] | None = None
    interval_t: list[float] | None = None


@dataclass
class Auto(_Interval):
    """Autoguidance: weak + scale * (strong - weak), the weaker model a run directory (null: this run) and one of
    its checkpoints (last, best, or a file: an earlier step)."""

    kind: ClassVar[str] = "auto"
    scale: float = 2.0
    rescale: float = 0.0
    interval: list[float] | None = None
    interval_t: list[float] | None = None
    weak_run: str | None = None
    weak_checkpoint: str = "last"


@dataclass
class Classifier(_Interval):
    """Classifier guidance: the score plus scale * grad log p(y | x_t) (ADM's s), on the prediction
    uncond + cfg_scale * (cond - uncond) (1: the conditional one, 0: the unconditional one)."""

    kind: ClassVar[str] = "classifier"
    scale: float = 1.0
    cfg_scale: float = 1.0
    rescale: float = 0.0
    interval: list[float] | None = None
    interval_t: list[float] | None = None
    classifier_run: str | None = None
    classifier_checkpoint: str = "last"


KINDS = {spec.kind: spec for spec in (CFG, Auto, Classifier)}
