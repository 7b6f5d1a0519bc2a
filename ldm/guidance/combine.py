"""Guidance as a wrapper of the network into the sampler's `model_fn(x_t, t)`, in the target space.

Every prediction of the parameterization is linear in (x0_hat, noise_hat), so a linear combination of two
predictions of the same x_t and t is the same combination of their data and noise estimates, and of their scores:
`reference + scale * (strong - reference)` means the same for every parameterization and sampler. The reference
is the unconditional prediction (classifier-free guidance, Ho & Salimans 2022) or a weaker model's (autoguidance,
Karras et al. 2024). A classifier's gradient enters as a shift of the score (ldm.guidance.classifier).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ldm.contracts.conditioning import Conditioning
from ldm.guidance.interval import NoiseInterval

Tensor = torch.Tensor
ModelFn = Callable[[Tensor, Tensor], Tensor]


def rescale_to_std(guided: Tensor, reference: Tensor, rescale: float) -> Tensor:
    """Mix in the guided prediction scaled to the reference's per-sample std (Lin et al. 2023, phi)."""
    dims = tuple(range(1, guided.ndim))
    matched = guided * reference.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True)
    return rescale * matched + (1 - rescale) * guided


def guided_model_fn(strong: ModelFn, pair: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]], schedule,
                    scale: float = 1.0, rescale: float = 0.0, interval: NoiseInterval | None = None,
                    shift: Callable[[Tensor, Tensor, Tensor], Tensor] | None = None) -> ModelFn:
    """model_fn(x_t, t) = reference + scale * (strong - reference), then `shift(x_t, pred, t)`, inside `interval`.

    `strong(x, t)`: the model's own (conditional) prediction; `pair(x, t) -> (strong, reference)`, computed
    together (one batched call for classifier-free guidance). scale = 1 calls `strong` alone. Outside the
    interval the strong prediction is used as it is, with no guidance of any kind.
    """

    def guide(x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        if scale == 1.0:
            pred = out = strong(x, t)
        else:
            pred, reference = pair(x, t)
            out = reference + scale * (pred - reference)
            if rescale > 0:
                out = rescale_to_std(out, pred, rescale)
        if shift is not None:
            out = shift(x, out, t)
        return out, pred

    def model_fn(x: Tensor, t: Tensor) -> Tensor:
        if interval is None:
            return guide(x, t)[0]
        inside = interval.inside(schedule, t)
        if not inside.any():
            return strong(x, t)
        out, pred = guide(x, t)
        return torch.where(inside.reshape(inside.shape + (1,) * (out.ndim - 1)), out, pred)

    return model_fn


def batched_pair(fn, cond: Conditioning, uncond: Conditioning):
    """(cond, uncond) predictions of fn(x, t, conditioning) from one call on the doubled batch."""
    both = Conditioning.cat([cond, uncond])

    def pair(x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        return fn(torch.cat([x, x]), torch.cat([t, t]), both).chunk(2)

    return pair


def classifier_free_guidance(fn, cond: Conditioning, uncond: Conditioning, scale: float = 1.0, rescale: float = 0.0,
                             interval: tuple[float, float] | NoiseInterval | None = None, schedule=None) -> ModelFn:
    """model_fn(x_t, t) = uncond + scale * (cond - uncond) from fn(x_t, t, conditioning).

    scale = 1 is off (one conditional call); otherwise both halves go through one batched call. `interval`: a
    NoiseInterval (in sigma needs `schedule`), or [t_lo, t_hi] in t; elsewhere the conditional prediction is used.
    """
    if interval is not None and not isinstance(interval, NoiseInterval):
        interval = NoiseInterval(float(interval[0]), float(interval[1]), in_t=True)
    return guided_model_fn(lambda x, t: fn(x, t, cond), batched_pair(fn, cond, uncond), schedule, scale, rescale,
                           interval)
