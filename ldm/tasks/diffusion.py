"""`LatentDiffusion`: the LightningModule that wires the three stages to a parameterization.

The math lives in `ldm.schedules` (noising, targets, weights, updates) and `ldm.samplers`; this
module only encodes, conditions, draws t and noise, and takes the weighted loss.
"""

from __future__ import annotations

import itertools

import lightning as L
import torch
from torch import nn

from ldm.conditioners import Conditioner, Conditioning
from ldm.contracts.autoencoder import Autoencoder
from ldm.contracts.batch import latents_from_batch
from ldm.finetune.adapters import base_name
from ldm.models import check_conditioning
from ldm.models.layers import fuse_attention_keys
from ldm.samplers.guidance import classifier_free_guidance
from ldm.tasks.optim import FusedClipping, make_optimizer, parameter_groups, upgraded_optimizer_state
from ldm.utils.checkpoint import EMA_KEY, CheckpointError
from ldm.utils.fingerprint import module_fingerprint, tensors_fingerprint
from ldm.utils.noise import randn, step_seed

VAL_SEED = 12345


class LatentDiffusion(FusedClipping, L.LightningModule):
    def __init__(self, autoencoder: Autoencoder, conditioner: Conditioner, denoiser: nn.Module, schedule,
                 sampler, image_size: int, optimizer=None, lr_scheduler=None,
                 scale_factor: float | None = None, shift_factor: float | None = 0.0,
                 sample_steps: int = 25, sample_guidance: float = 1.0, seed: int = 0):
        super().__init__()
        check_conditioning(denoiser, conditioner.provides)
        self.autoencoder = autoencoder.requires_grad_(False).eval()
        self.conditioner = conditioner
        self.denoiser = denoiser
        self.schedule = schedule
        self.sampler = sampler
        self.latent_shape = autoencoder.latent_shape(image_size)
        # `functools.partial`s from the optimizer / lr_scheduler configs (`_partial_: true`)
        self.make_optimizer = optimizer or torch.optim.AdamW
        self.make_lr_scheduler = lr_scheduler
        self.sample_steps, self.sample_guidance, self.seed = sample_steps, sample_guidance, seed
        # latents are (z - shift) * scale; measured from the data unless given, and saved in checkpoints
        self.fixed_scale, self.fixed_shift = scale_factor, shift_factor
        self.register_buffer("latent_scale", torch.tensor(1.0 if scale_factor is None else float(scale_factor)))
        self.register_buffer("latent_shift", torch.tensor(0.0 if shift_factor is None else float(shift_factor)))
        self.register_buffer("latent_stats_ready", torch.tensor(scale_factor is not None and shift_factor is not None))
        self._fingerprints: dict[str, str] | None = None
        self._base_keys: list[str] = []  # a fine-tune's frozen base (ldm.finetune): kept out of checkpoints

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

    @property
    def has_base(self) -> bool:
        """Whether a fine-tune froze a base that checkpoints reference instead of holding."""
        return bool(self._base_keys)

    def base_fingerprints(self) -> dict[str, str]:
        """Hashes of the frozen base's denoiser and conditioner weights, under the names of the unwrapped network."""
        state, parts = self.state_dict(), {}
        for part in ("denoiser", "conditioner"):
            tensors = {base_name(key[len(part) + 1:]): state[key] for key in self._base_keys
                       if key.startswith(f"{part}.")}
            if tensors:
                parts[f"base.{part}"] = tensors_fingerprint(tensors)
        return parts

    def train(self, mode: bool = True):
        super().train(mode)
        self.autoencoder.eval()  # frozen first stage: no dropout / norm updates, whatever the trainer does
        return self

    def full_precision(self):
        """Latents, noise, x_t, targets and weights stay float32 under any mixed precision."""
        return torch.autocast(self.device.type, enabled=False)

    # ---- stage 1: images <-> scaled latents -------------------------------------------------------
    @torch.no_grad()
    def measure_latent_stats(self, loader, max_batches: int = 20) -> None:
        """Set shift (mean, when not fixed) and scale so the training latents have the schedule's `data_std`."""
        if bool(self.latent_stats_ready):
            return
        with self.full_precision():
            batches = itertools.islice(loader, max_batches)
            z = torch.cat([self.raw_latents(batch).float().cpu() for batch in batches])
        shift = z.mean() if self.fixed_shift is None else torch.tensor(float(self.fixed_shift))
        scale = self.schedule.data_std / (z - shift).std() if self.fixed_scale is None else float(self.fixed_scale)
        self.latent_shift.fill_(float(shift))
        self.latent_scale.fill_(float(scale))
        self.latent_stats_ready.fill_(True)

    def raw_latents(self, batch: dict, sample: bool = True, generator: torch.Generator | None = None):
        return latents_from_batch(batch, self.autoencoder, sample, generator, device=self.device)

    def latents(self, batch: dict, sample: bool = True, generator: torch.Generator | None = None) -> torch.Tensor:
        with self.full_precision():
            return (self.raw_latents(batch, sample, generator).float() - self.latent_shift) * self.latent_scale

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.autoencoder.decode(z / self.latent_scale + self.latent_shift).clamp(-1.0, 1.0)

    # ---- stage 2: the diffusion loss --------------------------------------------------------------
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
        optimizer = make_optimizer(self.make_optimizer, parameter_groups(self), self._trainer)
        if self.make_lr_scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.make_lr_scheduler(optimizer),
                                                         "interval": "step"}}

    # ---- checkpoints: trained weights only; frozen parts are rebuilt and checked by hash ------------
    def frozen_parts(self) -> dict[str, nn.Module]:
        parts = {"autoencoder": self.autoencoder}
        parts.update({f"conditioner.{name}": m for name, m in self.conditioner.frozen_parts().items()})
        return parts

    def frozen_fingerprints(self) -> dict[str, str]:
        if self._fingerprints is None:  # frozen weights never change: hash them once
            self._fingerprints = {name: module_fingerprint(m) for name, m in self.frozen_parts().items()}
            self._fingerprints.update(self.base_fingerprints())
        return self._fingerprints

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        prefixes, base = tuple(f"{name}." for name in self.frozen_parts()), set(self._base_keys)
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items()
                                    if not k.startswith(prefixes) and k not in base}
        checkpoint["frozen_parts"] = dict(self.frozen_fingerprints())

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["state_dict"] = self.full_state_dict(checkpoint)
        # checkpoints from before self-attention had one fused qkv projection: EMA and optimizer moments too
        if checkpoint.get(EMA_KEY):
            checkpoint[EMA_KEY] = fuse_attention_keys(self, checkpoint[EMA_KEY])
        if "optimizer_states" in checkpoint:
            checkpoint["optimizer_states"] = [upgraded_optimizer_state(self, state)
                                              for state in checkpoint["optimizer_states"]]

    def full_state_dict(self, checkpoint: dict) -> dict[str, torch.Tensor]:
        """The checkpoint's trained weights plus this module's frozen parts, once their hashes agree."""
        stored = checkpoint.get("frozen_parts")
        if stored is None:
            raise CheckpointError("the checkpoint does not record its frozen parts (autoencoder, frozen text "
                                  "towers): it was written by an older version of ldm; retrain or re-export it")
        ours = self.frozen_fingerprints()
        for name in sorted(set(stored) | set(ours)):
            if stored.get(name) != ours.get(name):
                check = ("the base the run fine-tuned (its model.weights file or init_from run)"
                         if name.startswith("base.") else "the run's autoencoder and conditioner weight files and seed")
                raise CheckpointError(
                    f"frozen part '{name}' differs from the one this checkpoint was trained with (hash "
                    f"{ours.get(name)} here, {stored.get(name)} in the checkpoint): check {check}")
        frozen = {f"{name}.{key}": value for name, part in self.frozen_parts().items()
                  for key, value in part.state_dict().items()}
        own = self.state_dict()
        frozen.update({key: own[key] for key in self._base_keys})
        full = {**frozen, **checkpoint["state_dict"]}
        if problem := self.architecture_mismatch(full):
            raise CheckpointError(f"the checkpoint is of another model than this run's config builds: {problem}")
        return full

    def architecture_mismatch(self, state: dict[str, torch.Tensor]) -> str | None:
        """The first tensor whose shape (or presence) differs between `state` and this module, with the config
        group that sets it; None when they fit. Attention projections stored unfused (older files) are not
        compared: loading fuses them."""
        own = self.state_dict()
        group = {"denoiser": "model", "conditioner": "conditioner", "autoencoder": "autoencoder"}

        def where(name: str) -> str:
            key = group.get(name.split(".")[0])
            return f" (set by the {key}.* keys)" if key else ""

        for name, value in own.items():
            if name in state and tuple(state[name].shape) != tuple(value.shape):
                return (f"{name} has shape {tuple(state[name].shape)} in the checkpoint and {tuple(value.shape)} "
                        f"here{where(name)}")
        fused = (".to_q.", ".to_kv.", ".to_qkv.")
        missing = [name for name in own if name not in state and not any(part in name for part in fused)]
        extra = [name for name in state if name not in own and not any(part in name for part in fused)]
        if missing or extra:
            name = (missing or extra)[0]
            side = "the checkpoint has no" if missing else "this model has no"
            return f"{side} {name}{where(name)}"
        return None

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
    def sample(self, conditions: dict, n: int, sampler=None, steps: int | None = None, guidance: float | None = None,
               guidance_rescale: float = 0.0, guidance_interval=None,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw `n` images in [-1, 1] for a batch of conditions (labels, captions, ...)."""
        sampler = sampler or self.sampler
        steps = self.sample_steps if steps is None else steps
        guidance = self.sample_guidance if guidance is None else guidance
        conditions = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in conditions.items()}
        was_training = self.training
        self.eval()
        cond, uncond = self.conditioner(conditions), self.conditioner(conditions, force_drop=True)
        model_fn = classifier_free_guidance(self.predict, cond, uncond, scale=guidance, rescale=guidance_rescale,
                                            interval=guidance_interval)
        noise = randn((n, *self.latent_shape), generator=generator, device=self.device)
        z = sampler(model_fn, noise, self.schedule, steps, generator=generator)
        self.train(was_training)
        return self.decode(z)
