"""Logs the total gradient norm of every optimizer step, before clipping, as `train/grad_norm`."""

from __future__ import annotations

import lightning as L
import torch


class GradNorm(L.Callback):
    """`norm_type`-norm over all gradients, taken where Lightning has unscaled them and not yet clipped them."""

    def __init__(self, norm_type: float = 2.0):
        if norm_type <= 0:
            raise ValueError(f"callbacks.grad_norm.norm_type must be positive (2 is the usual norm), got {norm_type}")
        self.norm_type = float(norm_type)

    @torch.no_grad()
    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not grads:
            return
        norm = torch.nn.utils.get_total_norm(grads, self.norm_type)
        # under DDP the gradients are already averaged over ranks: every rank holds the same norm
        pl_module.log("train/grad_norm", norm, on_step=True, on_epoch=False)
