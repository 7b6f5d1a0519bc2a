"""`LatentDiffusion`: the LightningModule that wires the three stages to a parameterization.

The math lives in `ldm.schedules` (noising, targets, weights, updates) and `ldm.samplers`; this
module only encodes, conditions, draws t and noise, and takes the weighted loss.
"""

from __future__ import annotations

import lightning as L
import torch
from torch import nn

from ldm.autoencoders.base import Autoencoder, sample_posterior
from ldm.conditioners import Conditioner, Conditioning
from ldm.models import check_conditioning
from ldm.samplers.guidance import classifier_free_guidance

VAL_SEED = 12345


class LatentDiffusion(L.LightningModule):
    def __init__(self, autoencoder: Autoencoder, conditioner: Conditioner, denoiser: nn.Module, schedule,
                 sampler, image_size: int, lr: float = 3e-4, weight_decay: float = 0.0,
                 betas: tuple[float, float] = (0.9, 0.999), warmup_steps: int = 0,
                 scale_factor: float | None = None, shift_factor: float | None = 0.0,
                 sample_steps: int = 25, sample_guidance: float = 1.0):
        super().__init__()
        check_conditioning(denoiser, conditioner.provides)
        self.autoencoder = autoencoder.requires_grad_(False).eval()
        self.conditioner = conditioner
        self.denoiser = denoiser
        self.schedule = schedule
        self.sampler = sampler
        self.latent_shape = autoencoder.latent_shape(image_size)
        self.lr, self.weight_decay, self.betas, self.warmup_steps = lr, weight_decay, tuple(betas), warmup_steps
        self.sample_steps, self.sample_guidance = sample_steps, sample_guidance
        # latents are (z - shift) * scale; measured from the data unless given, and saved in checkpoints
        self.fixed_scale, self.fixed_shift = scale_factor, shift_factor
        self.register_buffer("latent_scale", torch.tensor(1.0 if scale_factor is None else float(scale_factor)))
        self.register_buffer("latent_shift", torch.tensor(0.0 if shift_factor is None else float(shift_factor)))
        self.register_buffer("latent_stats_ready", torch.tensor(scale_factor is not None and shift_factor is not None))

    def train(self, mode: bool = True):
        super().train(mode)
        self.autoencoder.eval()  # frozen first stage: no dropout / norm updates, whatever the trainer does
        return self

    # ---- stage 1: images <-> scaled latents -------------------------------------------------------
    @torch.no_grad()
    def measure_latent_stats(self, loader, max_batches: int = 20) -> None:
        """Set scale (1 / std) and, when not fixed, shift (mean) from posterior samples of training data."""
        if bool(self.latent_stats_ready):
            return
        samples = []
        for i, batch in enumerate(loader):
            if i >= max_batches:
                break
            samples.append(self._raw_latents(batch).float().cpu())
        z = torch.cat(samples)
        shift = z.mean() if self.fixed_shift is None else torch.tensor(float(self.fixed_shift))
        scale = 1.0 / (z - shift).std() if self.fixed_scale is None else torch.tensor(float(self.fixed_scale))
        self.latent_shift.fill_(shift.item())
        self.latent_scale.fill_(scale.item())
        self.latent_stats_ready.fill_(True)

    def _raw_latents(self, batch: dict, sample: bool = True) -> torch.Tensor:
        if "latent_mean" in batch:  # from the offline cache: draw a fresh posterior sample every step
            mean, std = batch["latent_mean"].to(self.device), batch["latent_std"].to(self.device)
            return sample_posterior(mean, std) if sample else mean
        with torch.no_grad():
            return self.autoencoder.encode(batch["image"].to(self.device), sample=sample)

    def latents(self, batch: dict, sample: bool = True) -> torch.Tensor:
        return (self._raw_latents(batch, sample) - self.latent_shift) * self.latent_scale

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.autoencoder.decode(z / self.latent_scale + self.latent_shift).clamp(-1.0, 1.0)

    # ---- stage 2: the diffusion loss --------------------------------------------------------------
    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The network's output in the parameterization's target space."""
        x_in, t_in = self.schedule.model_input(x_t, t)
        return self.denoiser(x_in, t_in, cond)

    def diffusion_loss(self, z0, noise, t, cond) -> torch.Tensor:
        x_t = self.schedule.noised(z0, noise, t)
        pred = self.predict(x_t, t, cond).float()
        target = self.schedule.target(z0, noise, t).float()
        per_sample = (pred - target).pow(2).flatten(1).mean(1)
        return (self.schedule.loss_weight(t).to(per_sample) * per_sample).mean()

    def training_step(self, batch, batch_idx):
        z0 = self.latents(batch)
        cond = self.conditioner(batch)
        noise = torch.randn_like(z0)
        t = self.schedule.sample_t(z0.shape[0]).to(z0.device, torch.float32)
        loss = self.diffusion_loss(z0, noise, t, cond)
        self.log("train/loss", loss, prog_bar=True, batch_size=z0.shape[0])
        return loss

    def validation_step(self, batch, batch_idx):
        # fixed latents (posterior mean), t and noise per batch index: comparable across runs and steps
        generator = torch.Generator().manual_seed(VAL_SEED + batch_idx)
        z0 = self.latents(batch, sample=False)
        t = self.schedule.sample_t(z0.shape[0], generator=generator).to(z0.device, torch.float32)
        noise = torch.randn(z0.shape, generator=generator).to(z0)
        loss = self.diffusion_loss(z0, noise, t, self.conditioner(batch))
        self.log("val/loss", loss, prog_bar=True, batch_size=z0.shape[0])

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay, betas=self.betas)
        if not self.warmup_steps:
            return optimizer
        warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / self.warmup_steps))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": warmup, "interval": "step"}}

    # ---- sampling ---------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, conditions: dict, n: int, sampler=None, steps: int | None = None, guidance: float | None = None,
               guidance_rescale: float = 0.0, guidance_interval=None,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw `n` images in [-1, 1] for a batch of conditions (labels, captions, ...)."""
        sampler = sampler or self.sampler
        steps = steps or self.sample_steps
        guidance = self.sample_guidance if guidance is None else guidance
        conditions = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in conditions.items()}
        was_training = self.training
        self.eval()
        cond, uncond = self.conditioner(conditions), self.conditioner(conditions, force_drop=True)
        model_fn = classifier_free_guidance(self.predict, cond, uncond, scale=guidance, rescale=guidance_rescale,
                                            interval=guidance_interval)
        noise = torch.randn((n, *self.latent_shape), generator=generator,
                            device=generator.device if generator else self.device).to(self.device)
        z = sampler(model_fn, noise, self.schedule, steps, generator=generator)
        self.train(was_training)
        return self.decode(z)
