"""Samples for evaluation, each a function of its index: sample i starts from noise seeded by (seed, i) and asks
for the condition of index i, so a set of N samples is the same whatever the batch size or the number of devices.

Deterministic samplers (euler, heun, dpmpp_2m) then give exactly the same images. Stochastic ones (ancestral,
euler_ancestral) also draw noise at every step, for the whole batch at once: their generator is seeded by the
batch's first index and length, so their samples change with the batching (not with the number of devices,
since every device takes the same contiguous batches; see `index_batches`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ldm.guidance import Guidance, as_guidance
from ldm.utils.errors import ConfigError, UserError
from ldm.utils.noise import step_seed

LABEL, CAPTION = "label", "caption"  # the condition inputs an evaluation can give


def requested_prompts(cfg) -> list[str] | None:
    """The captions a command asks for: `prompts_file=` (one per line) or `prompts=`, else None."""
    if cfg.prompts_file:
        prompts = [line.strip() for line in Path(cfg.prompts_file).read_text().splitlines() if line.strip()]
        if not prompts:
            raise ConfigError([f"prompts_file={cfg.prompts_file} holds no prompt (one per line)"])
        return prompts
    return list(cfg.prompts) if cfg.prompts is not None else None


def sample_seed(seed: int, index: int) -> int:
    """The seed of sample `index`'s starting noise."""
    return step_seed(seed, index)


def starting_noise(indices: Sequence[int], shape: Sequence[int], seed: int) -> torch.Tensor:
    """(len(indices), *shape) unit noise on the CPU, row k drawn from seed (seed, indices[k])."""
    return torch.stack([torch.randn(tuple(shape), generator=torch.Generator().manual_seed(sample_seed(seed, int(i))))
                        for i in indices])


def index_batches(n: int, batch_size: int, rank: int = 0, world_size: int = 1) -> list[list[int]]:
    """This rank's batches of sample indices: a contiguous share of range(n), so that features gathered from the
    ranks in rank order come in index order, as in one process."""
    start, stop = rank * n // world_size, (rank + 1) * n // world_size
    return [list(range(first, min(first + batch_size, stop))) for first in range(start, stop, batch_size)]


@dataclass
class Conditions:
    """What sample i asks for: label i mod the classes (or of `labels`), caption i mod the `captions`."""

    input_keys: Sequence[str]
    num_classes: int | None = None
    captions: Sequence[str] | None = None
    labels: Sequence[int] | None = None

    def __post_init__(self):
        problems = []
        unknown = sorted(set(self.input_keys) - {LABEL, CAPTION})
        if unknown:
            problems.append(f"the run's conditioner reads {unknown}; evaluation can give only labels and captions")
        if LABEL in self.input_keys and not (self.labels or self.num_classes):
            problems.append("the run is conditioned on labels but its number of classes is unknown: give labels=[...]")
        if CAPTION in self.input_keys and not self.captions:
            problems.append("the run is conditioned on captions: give prompts=[...] or prompts_file=FILE "
                            "(by default the captions of the reference split)")
        if problems:
            raise UserError(problems)

    def __call__(self, indices: Sequence[int]) -> dict:
        out: dict = {}
        if LABEL in self.input_keys:
            out[LABEL] = torch.tensor([self.labels[i % len(self.labels)] if self.labels else i % self.num_classes
                                       for i in indices])
        if CAPTION in self.input_keys:
            out[CAPTION] = [self.captions[i % len(self.captions)] for i in indices]
        return out


@dataclass
class SamplingSettings:
    """How samples are drawn; `nfe` (network evaluations per image) counts a guided call once."""

    sampler: object
    steps: int
    guidance: Guidance  # a number is classifier-free guidance of that scale
    seed: int = 0

    def __post_init__(self):
        if not isinstance(self.guidance, Guidance):
            self.guidance = as_guidance(float(self.guidance), 1.0)

    @property
    def nfe(self) -> int:
        # sequential network calls per image (heun: 2 per step but the last); guidance doubles the batch of
        # each call, not the number of calls
        return int(self.sampler.calls(self.steps))

    def record(self) -> dict:
        return {"sampler": type(self.sampler).__name__, "steps": self.steps, "nfe": self.nfe,
                **self.guidance.record(), "network_batches_per_image": self.nfe * self.guidance.network_batches(),
                "seed": self.seed}


@torch.no_grad()
def seeded_samples(module, conditions: dict, indices: Sequence[int], settings: SamplingSettings,
                   callback=None) -> torch.Tensor:
    """Images (len(indices), C, H, W) in [-1, 1] from the module's current weights.

    `callback` sees each sampler step ({"i", "t", "x", "x0"}), e.g. for trajectories."""
    indices = [int(i) for i in indices]
    conditions = {k: v.to(module.device) if torch.is_tensor(v) else v for k, v in conditions.items()}
    was_training = module.training
    module.eval()
    try:
        model_fn = settings.guidance.model_fn(module, conditions)
        noise = starting_noise(indices, module.latent_shape, settings.seed).to(module.device)
        generator = None
        if getattr(settings.sampler, "stochastic", False):
            generator = torch.Generator().manual_seed(step_seed(settings.seed, indices[0], len(indices), 1))
        z = settings.sampler(model_fn, noise, module.schedule, settings.steps, generator=generator, callback=callback)
        return module.decode(z)
    finally:
        module.train(was_training)
