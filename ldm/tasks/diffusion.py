"""`LatentDiffusion`: the LightningModule that wires the three stages to a parameterization.

The math lives in `ldm.schedules` (noising, targets, weights, updates) and `ldm.samplers`; this
module only encodes, conditions, draws t and noise, and takes the weighted loss.
"""

from __future__ import annotations

import lightning as L
import torch
from torch import nn

from ldm.conditioners import Conditioner, Conditioning
from ldm.contracts.autoencoder import Autoencoder
from ldm.guidance import Guidance, as_guidance
from ldm.models import check_conditioning
from ldm.models.layers import fuse_attention_keys
from ldm.tasks.latent_space import LatentSpace
from ldm.tasks.optim import (
    FusedClipping,
    optimizers_with_schedule,
    upgraded_optimizer_state,
)
from ldm.utils.checkpoint import EMA_KEY
from ldm.utils.noise import randn, step_seed

VAL_SEED = 12345


class LatentDiffusion(FusedClipping, LatentSpace, L.LightningModule):
    def __init__(self, autoencoder: Autoencoder, conditioner: Conditioner, denoiser: nn.Module, schedule,
                 sampler, image_size: int, optimizer=None, lr_scheduler=None,
                 scale_factor: float | None = None, shift_factor: float | None = 0.0,
                 sample_steps: int = 25, sample_guidance: float = 1.0, seed: int = 0):
        super().__init__()
        check_conditioning(denoiser, conditioner.provides)
        self.init_latents(autoencoder, image_size, scale_factor, shift_factor)
        self.conditioner = conditioner
        self.denoiser = denoiser
        self.schedule = schedule
        self.sampler = sampler
        # `functools.partial`s from the optimizer / lr_scheduler configs (`_partial_: true`)
        self.make_optimizer = optimizer or torch.optim.AdamW
        self.make_lr_scheduler = lr_scheduler
        self.sample_steps, self.sample_guidance, self.seed = sample_steps, sample_guidance, seed

    # ---- stage 2: the diffusion loss --------------------------------------------------------------
    def adapt(self, finetune) -> None:
        """Apply a fine-tune (ldm.finetune) to the denoiser. With a frozen base (lora, partial), the conditioner's
        weights join the base, and checkpoints hold only what trains, the base referenced by its hash."""
        finetune.apply(self.denoiser)
        if not finetune.has_base:
            return
        self.conditioner.requires_grad_(False)
        trainable = {name for name, parameter in self.named_parameters() if parameter.requires_grad}
        frozen = tuple(f"{name}." for name in self.frozen_parts())
        self._base_keys = [key for key in self.state_dict() if key.startswith(("denoiser.", "conditioner."))
                           and key not in trainable and not key.startswith(frozen)]
        self._fingerprints = None

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The network's output in the parameterization's target space."""
        x_in, t_in = self.schedule.model_input(x_t, t)
        return self.denoiser(x_in, t_in, cond)

    def diffusion_loss(self, z0, noise, t, cond) -> torch.Tensor:
        with self.full_precision():
            x_t = self.schedule.noised(z0, noise, t)
            target = self.schedule.target(z0, noise, t).float()
            weight = self.schedule.loss_weight(t).float()
            x_in, t_in = self.schedule.model_input(x_t, t)
        pred = self.denoiser(x_in, t_in, cond).float()
        per_sample = (pred - target).pow(2).flatten(1).mean(1)
        return (weight * per_sample).mean()

    def _draw(self, batch: dict, generator: torch.Generator, sample: bool):
        """Latents, noise and times of a batch, all from `generator` (float32)."""
        z0 = self.latents(batch, sample=sample, generator=generator)
        noise = randn(z0.shape, generator=generator, device=z0.device)
        t = self.schedule.sample_t(z0.shape[0], generator=generator).to(z0.device, torch.float32)
        return z0, noise, t

    def training_generator(self, batch_idx: int) -> torch.Generator:
        """This step's randomness, a function of (seed, rank, step, batch): a resumed run draws the same."""
        generator = torch.Generator(self.device)
        return generator.manual_seed(step_seed(self.seed, self.global_rank, self.global_step, batch_idx))

    def training_step(self, batch, batch_idx):
        generator = self.training_generator(batch_idx)
        z0, noise, t = self._draw(batch, generator, sample=True)
        loss = self.diffusion_loss(z0, noise, t, self.conditioner(batch, generator=generator))
        self.log("train/loss", loss, prog_bar=True, batch_size=z0.shape[0])
        return loss

    def validation_step(self, batch, batch_idx):
        # fixed latents (posterior mean), t and noise per batch index: comparable across runs and steps
        # numbered across ranks, so the validation loss does not depend on the number of devices
        datamodule = getattr(self._trainer, "datamodule", None)
        number = datamodule.val_batch_number(batch_idx) if hasattr(datamodule, "val_batch_number") else batch_idx
        generator = torch.Generator().manual_seed(VAL_SEED + number)
        z0, noise, t = self._draw(batch, generator, sample=False)
        loss = self.diffusion_loss(z0, noise, t, self.conditioner(batch))
        self.log("val/loss", loss, prog_bar=True, batch_size=z0.shape[0], sync_dist=True)

    def configure_optimizers(self):
        return optimizers_with_schedule(self)

    # ---- checkpoints: trained weights only (ldm.tasks.latent_space); older layouts upgraded on load -------
    def frozen_parts(self) -> dict[str, nn.Module]:
        parts = {"autoencoder": self.autoencoder}
        parts.update({f"conditioner.{name}": m for name, m in self.conditioner.frozen_parts().items()})
        return parts

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["state_dict"] = self.full_state_dict(checkpoint)
        # checkpoints from before self-attention had one fused qkv projection: EMA and optimizer moments too
        if checkpoint.get(EMA_KEY):
            checkpoint[EMA_KEY] = fuse_attention_keys(self, checkpoint[EMA_KEY])
        if "optimizer_states" in checkpoint:
            checkpoint["optimizer_states"] = [upgraded_optimizer_state(self, state)
                                              for state in checkpoint["optimizer_states"]]

    def load_checkpoint(self, checkpoint: dict, ema: bool = True) -> None:
        """Load a training checkpoint's weights: the EMA average where it has one (and `ema`), else the raw ones."""
        self.load_state_dict(self.full_state_dict(checkpoint), strict=True)
        average = checkpoint.get(EMA_KEY) if ema else None
        if average:
            average = fuse_attention_keys(self, average)
            params = dict(self.named_parameters())
            with torch.no_grad():
                for name, value in average.items():
                    params[name].copy_(value)

    # ---- sampling ---------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, conditions: dict, n: int, sampler=None, steps: int | None = None,
               guidance: Guidance | float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw `n` images in [-1, 1] for a batch of conditions (labels, captions, ...). `guidance`: a `Guidance`
        (ldm.run.guidance builds one from the `guidance` config), a classifier-free scale, or None for the run's
        `sample_guidance`."""
        sampler = sampler or self.sampler
        steps = self.sample_steps if steps is None else steps
        guidance = as_guidance(guidance, self.sample_guidance)
        conditions = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in conditions.items()}
        was_training = self.training
        self.eval()
        model_fn = guidance.model_fn(self, conditions)
        noise = randn((n, *self.latent_shape), generator=generator, device=self.device)
        z = sampler(model_fn, noise, self.schedule, steps, generator=generator)
        self.train(was_training)
        return self.decode(z)
