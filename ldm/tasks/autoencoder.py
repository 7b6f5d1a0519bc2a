"""Stage 1: the Lightning module that trains a KL autoencoder (reconstruction + KL)."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F

from ldm.autoencoders.kl import KLAutoencoder
from ldm.contracts.autoencoder import sample_posterior
from ldm.tasks.optim import FusedClipping, make_optimizer


class AutoencoderTraining(FusedClipping, L.LightningModule):
    """L1 + MSE reconstruction plus `kl_weight` * KL(q(z|x) || N(0, I)), per latent element."""

    def __init__(self, autoencoder: KLAutoencoder, lr: float = 1e-3, kl_weight: float = 1e-4,
                 export_path: str | None = None):
        super().__init__()
        self.autoencoder = autoencoder
        self.lr = lr
        self.kl_weight = kl_weight
        self.export_path = export_path

    def _losses(self, images: torch.Tensor, sample: bool) -> dict[str, torch.Tensor]:
        mean, std = self.autoencoder.encode_posterior(images)
        z = sample_posterior(mean, std) if sample else mean
        recon = self.autoencoder.decode(z)
        rec = F.l1_loss(recon, images) + F.mse_loss(recon, images)
        kl = 0.5 * (mean.pow(2) + std.pow(2) - 1.0 - 2.0 * torch.log(std.clamp_min(1e-12))).mean()
        return {"loss": rec + self.kl_weight * kl, "rec": rec, "kl": kl, "mse": F.mse_loss(recon, images)}

    def training_step(self, batch, batch_idx):
        losses = self._losses(batch["image"], sample=True)
        self.log_dict({f"train/{k}": v for k, v in losses.items()}, prog_bar=True)
        return losses["loss"]

    def validation_step(self, batch, batch_idx):
        losses = self._losses(batch["image"], sample=False)
        self.log_dict({f"val/{k}": v for k, v in losses.items()}, batch_size=len(batch["image"]))

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        return self.autoencoder.decode(self.autoencoder.encode(images, sample=False))

    def configure_optimizers(self):
        # the fused kernel where the device has one, as the diffusion task's (see make_optimizer)
        factory = partial(torch.optim.AdamW, lr=self.lr, weight_decay=0.0, fused=None, foreach=None)
        return make_optimizer(factory, [{"params": list(self.autoencoder.parameters())}], self._trainer)

    def export(self, run_dir: Path) -> list[Path]:
        """Save the weights as safetensors in the run directory (and to `export_path`, if set)."""
        paths = [run_dir / "autoencoder.safetensors"] + ([Path(self.export_path)] if self.export_path else [])
        for path in paths:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.autoencoder.save_weights(path)
        return paths
