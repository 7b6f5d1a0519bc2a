"""The validation loss per noise level: where in t the model is good or bad, comparable across steps and runs.

At every validation, the first `batch_size` validation items (posterior-mean latents), fixed noise, and in each
of `bins` equal bins of t the same batch at t spread evenly over the bin; logged as `val/loss_t0.0-0.1`, ....
The loss is the run's own (its loss weight included), as `val/loss` is, with the weights validation uses.
"""

from __future__ import annotations

from contextlib import nullcontext

import lightning as L
import torch
from torch.utils.data import default_collate

from ldm.callbacks.ema import find_ema
from ldm.utils.noise import randn


def bin_edges(bins: int) -> list[float]:
    return [b / bins for b in range(bins + 1)]


def bin_name(lo: float, hi: float) -> str:
    """`val/loss_t0.0-0.1`: the fewest decimals that write every edge exactly."""
    decimals = next((d for d in range(1, 4) if round(lo, d) == lo and round(hi, d) == hi), 3)
    return f"val/loss_t{lo:.{decimals}f}-{hi:.{decimals}f}"


class NoiseLevelLoss(L.Callback):
    """Loss of a fixed validation batch in `bins` bins of t, from fixed noise (`seed`); rank 0 only."""

    def __init__(self, bins: int = 10, batch_size: int = 64, seed: int = 0):
        if bins < 1 or batch_size < 1:
            raise ValueError(f"callbacks.noise_levels: bins and batch_size must be at least 1, got {bins} and "
                             f"{batch_size}")
        self.bins, self.batch_size, self.seed = bins, batch_size, seed
        self._batch: dict | None = None

    def fixed_batch(self, trainer) -> dict:
        """The first validation items, collated once (a cached split gives latents, not images)."""
        if self._batch is None:
            dataset = trainer.datamodule.val_set
            with torch.random.fork_rng(devices=[]):  # a cached split may draw a stored variant
                self._batch = default_collate([dataset[i] for i in range(min(self.batch_size, len(dataset)))])
        return self._batch

    @torch.no_grad()
    def losses(self, trainer, module) -> dict[str, float]:
        batch = {k: v.to(module.device) if torch.is_tensor(v) else v for k, v in self.fixed_batch(trainer).items()}
        z0 = module.latents(batch, sample=False)
        noise = randn(z0.shape, generator=torch.Generator().manual_seed(self.seed), device=z0.device)
        cond = module.conditioner(batch)
        # t spread over the open bin: the midpoints of size equal slices, so no t is exactly 0 or 1
        spread = (torch.arange(len(z0), device=z0.device, dtype=torch.float32) + 0.5) / len(z0)
        edges = bin_edges(self.bins)
        return {bin_name(lo, hi): float(module.diffusion_loss(z0, noise, lo + (hi - lo) * spread, cond))
                for lo, hi in zip(edges[:-1], edges[1:], strict=True)}

    def on_validation_epoch_end(self, trainer, pl_module):
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        ema = find_ema(trainer)
        was_training = pl_module.training
        pl_module.eval()
        with ema.applied(pl_module) if ema is not None else nullcontext(), \
                trainer.precision_plugin.forward_context():
            values = self.losses(trainer, pl_module)
        pl_module.train(was_training)
        for name, value in values.items():
            pl_module.log(name, value, rank_zero_only=True)
