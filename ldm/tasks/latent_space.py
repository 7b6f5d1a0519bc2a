"""`LatentSpace`: what a task trained on a frozen autoencoder's scaled latents shares (the diffusion model and the
noise-conditional classifier of classifier guidance): the latents' scale and shift, measured once from the data
and stored in the checkpoint, and checkpoints that reference the frozen parts by hash instead of storing them."""

from __future__ import annotations

import itertools

import torch
from torch import nn

from ldm.contracts.autoencoder import Autoencoder
from ldm.contracts.batch import latents_from_batch
from ldm.finetune.adapters import base_name
from ldm.utils.checkpoint import CheckpointError
from ldm.utils.fingerprint import module_fingerprint, tensors_fingerprint

# the config group that sets each top-level part, for errors about a checkpoint of another architecture
CONFIG_GROUPS = {"denoiser": "model", "conditioner": "conditioner", "autoencoder": "autoencoder",
                 "classifier": "classifier"}


class LatentSpace:
    """Mixin for a LightningModule with `self.schedule` (its `data_std`); call `init_latents` in `__init__`."""

    def init_latents(self, autoencoder: Autoencoder, image_size: int, scale_factor: float | None,
                     shift_factor: float | None) -> None:
        self.autoencoder = autoencoder.requires_grad_(False).eval()
        self.latent_shape = autoencoder.latent_shape(image_size)
        # latents are (z - shift) * scale; measured from the data unless given, and saved in checkpoints
        self.fixed_scale, self.fixed_shift = scale_factor, shift_factor
        self.register_buffer("latent_scale", torch.tensor(1.0 if scale_factor is None else float(scale_factor)))
        self.register_buffer("latent_shift", torch.tensor(0.0 if shift_factor is None else float(shift_factor)))
        self.register_buffer("latent_stats_ready", torch.tensor(scale_factor is not None and shift_factor is not None))
        self._fingerprints: dict[str, str] | None = None
        self._base_keys: list[str] = []  # a fine-tune's frozen base (ldm.finetune): kept out of checkpoints

    def train(self, mode: bool = True):
        super().train(mode)
        self.autoencoder.eval()  # frozen first stage: no dropout / norm updates, whatever the trainer does
        return self

    def full_precision(self):
        """Latents, noise, x_t, targets and weights stay float32 under any mixed precision."""
        return torch.autocast(self.device.type, enabled=False)

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

    # ---- checkpoints: trained weights only; frozen parts are rebuilt and checked by hash ------------
    def frozen_parts(self) -> dict[str, nn.Module]:
        return {"autoencoder": self.autoencoder}

    def frozen_fingerprints(self) -> dict[str, str]:
        if self._fingerprints is None:  # frozen weights never change: hash them once
            self._fingerprints = {name: module_fingerprint(m) for name, m in self.frozen_parts().items()}
            self._fingerprints.update(self.base_fingerprints())
        return self._fingerprints

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

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        prefixes, base = tuple(f"{name}." for name in self.frozen_parts()), set(self._base_keys)
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items()
                                    if not k.startswith(prefixes) and k not in base}
        checkpoint["frozen_parts"] = dict(self.frozen_fingerprints())

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

        def where(name: str) -> str:
            key = CONFIG_GROUPS.get(name.split(".")[0])
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
