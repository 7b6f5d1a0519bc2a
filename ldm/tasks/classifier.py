"""`task=classifier`: the noise-conditional classifier p(y | x_t) of classifier guidance (ADM), trained on the
latents a diffusion run of the same data and autoencoder sees, noised by the run's own schedule at times drawn
by its own time sampler."""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from ldm.contracts.autoencoder import Autoencoder
from ldm.tasks.latent_space import LatentSpace
from ldm.tasks.optim import FusedClipping, optimizers_with_schedule
from ldm.utils.noise import randn, step_seed

VAL_SEED = 54321


class ClassifierTraining(FusedClipping, LatentSpace, L.LightningModule):
    """Cross-entropy of `classifier(*schedule.model_input(x_t, t))` against the batch's `label_key`."""

    def __init__(self, autoencoder: Autoencoder, classifier: nn.Module, schedule, image_size: int,
                 label_key: str = "label", optimizer=None, lr_scheduler=None, scale_factor: float | None = None,
                 shift_factor: float | None = 0.0, seed: int = 0):
        super().__init__()
        self.schedule = schedule
        self.init_latents(autoencoder, image_size, scale_factor, shift_factor)
        self.classifier = classifier
        self.label_key, self.seed = label_key, seed
        self.make_optimizer = optimizer or torch.optim.AdamW
        self.make_lr_scheduler = lr_scheduler

    def logits(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.classifier(*self.schedule.model_input(x_t, t)).float()

    def log_likelihood(self, labels: torch.Tensor):
        """log p(y | x_t) for `labels` (B,): the function classifier guidance differentiates."""

        def log_likelihood(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            index = labels.clone()[:, None].long()  # a copy made where the gradient is taken (not inference mode)
            return F.log_softmax(self.logits(x_t, t), dim=1).gather(1, index)[:, 0]

        return log_likelihood

    def _losses(self, batch: dict, generator: torch.Generator, sample: bool) -> tuple[torch.Tensor, torch.Tensor]:
        z0 = self.latents(batch, sample=sample, generator=generator)
        noise = randn(z0.shape, generator=generator, device=z0.device)
        t = self.schedule.sample_t(z0.shape[0], generator=generator).to(z0.device, torch.float32)
        with self.full_precision():
            x_t = self.schedule.noised(z0, noise, t)
        logits = self.logits(x_t, t)
        labels = batch[self.label_key].to(logits.device).long()
        return F.cross_entropy(logits, labels), (logits.argmax(1) == labels).float().mean()

    def training_step(self, batch, batch_idx):
        generator = torch.Generator(self.device).manual_seed(
            step_seed(self.seed, self.global_rank, self.global_step, batch_idx))
        loss, accuracy = self._losses(batch, generator, sample=True)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch[self.label_key]))
        self.log("train/accuracy", accuracy, batch_size=len(batch[self.label_key]))
        return loss

    def validation_step(self, batch, batch_idx):
        datamodule = getattr(self._trainer, "datamodule", None)
        number = datamodule.val_batch_number(batch_idx) if hasattr(datamodule, "val_batch_number") else batch_idx
        loss, accuracy = self._losses(batch, torch.Generator().manual_seed(VAL_SEED + number), sample=False)
        size = len(batch[self.label_key])
        self.log("val/loss", loss, prog_bar=True, batch_size=size, sync_dist=True)
        self.log("val/accuracy", accuracy, prog_bar=True, batch_size=size, sync_dist=True)

    def configure_optimizers(self):
        return optimizers_with_schedule(self)

    def load_checkpoint(self, checkpoint: dict) -> None:
        self.load_state_dict(self.full_state_dict(checkpoint), strict=True)
