"""Classifier-free guidance: wraps a conditional network into a `model_fn` for any sampler."""

from __future__ import annotations

import torch

from ldm.contracts.conditioning import Conditioning

Tensor = torch.Tensor


def rescale_to_std(guided: Tensor, reference: Tensor, rescale: float) -> Tensor:
    """Mix in the guided prediction scaled to the reference's per-sample std (Lin et al. 2023, phi)."""
    dims = tuple(range(1, guided.ndim))
    matched = guided * reference.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True)
    return rescale * matched + (1 - rescale) * guided


def classifier_free_guidance(
    fn,
    cond: Conditioning,
    uncond: Conditioning,
    scale: float = 1.0,
    rescale: float = 0.0,
    interval: tuple[float, float] | None = None,
):
    """model_fn(x_t, t) = uncond + scale * (cond - uncond) from fn(x_t, t, conditioning).

    scale = 1 is off (one conditional call). Otherwise both halves go through one batched call.
    `interval = [t_lo, t_hi]` guides only there; elsewhere the conditional prediction is used.
    """
    if scale == 1.0:
        return lambda x, t: fn(x, t, cond)
    if interval is not None and not interval[0] <= interval[1]:
        raise ValueError(f"guidance interval must be [t_lo, t_hi] with t_lo <= t_hi, got {list(interval)}")
    both = Conditioning.cat([cond, uncond])

    def guided(x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        pred_cond, pred_uncond = fn(torch.cat([x, x]), torch.cat([t, t]), both).chunk(2)
        out = pred_uncond + scale * (pred_cond - pred_uncond)
        if rescale > 0:
            out = rescale_to_std(out, pred_cond, rescale)
        return out, pred_cond

    def model_fn(x: Tensor, t: Tensor) -> Tensor:
        if interval is None:
            return guided(x, t)[0]
        inside = (t >= interval[0]) & (t <= interval[1])
        if not inside.any():
            return fn(x, t, cond)
        out, pred_cond = guided(x, t)
        return torch.where(inside.reshape((-1,) + (1,) * (x.ndim - 1)), out, pred_cond)

    return model_fn
