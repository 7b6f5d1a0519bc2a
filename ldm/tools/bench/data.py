"""The offline cache against encoding every step, in LatentDiffusion's own training step.

Pairs: data=digits; data=shapes with the small frozen text tower of experiment=shapes_text, and
with a ViT-B-32-size one; and the small DiT against the small UNet on digits.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from tempfile import TemporaryDirectory

import hydra
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device

import ldm  # noqa: F401  (registers the config resolvers)
from ldm.data.cache import data_identity
from ldm.run.build import build_diffusion
from ldm.tools.bench.configs import train_config
from ldm.tools.bench.measure import Comparison, Member

# a small shapes set: building its cache runs the frozen tower over every caption once
SHAPES_TEXT = ["experiment=shapes_text", "data.train.num_samples=128", "data.val.num_samples=32"]
VIT_B_32_TEXT = SHAPES_TEXT + ["conditioner=clip_text", "conditioner.embedders.0.pretrained=null"]


def build_training(overrides: list[str], cache_dir: str, device: torch.device):
    """The configured LatentDiffusion on `device`, its datamodule, its training step on one batch, and its optimizer."""
    cfg = train_config(overrides + ["paths.output_dir=.", f"data.cache_dir={cache_dir}"])
    module = build_diffusion(cfg)
    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.attach_cache(module.autoencoder, module.conditioner, data_identity(cfg.data))
    module.measure_latent_stats(datamodule.train_dataloader(), max_batches=2)
    module = module.to(device).train()
    batch = move_data_to_device(next(iter(datamodule.train_dataloader())), device)
    optimizer = module.configure_optimizers()
    optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer

    def step() -> None:
        loss = module.training_step(batch, 0)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return cfg, module, datamodule, step, optimizer


def training_member(label: str, overrides: list[str], cache_dir: str, device: torch.device) -> Member:
    """LatentDiffusion's training step (with its optimizer) on one batch of the configured data."""
    _, module, _, step, _ = build_training(overrides, cache_dir, device)
    return Member(label, step, sum(p.numel() for p in module.parameters() if p.requires_grad))


def pair(name: str, a: tuple[str, list[str]], b: tuple[str, list[str]], batch_size: int, cache_dir: str,
         device: torch.device) -> Comparison:
    common = [f"data.batch_size={batch_size}", "logger=none"]
    members = [training_member(label, common + overrides, cache_dir, device) for label, overrides in (a, b)]
    return Comparison(group="data", name=name, batch_size=batch_size, members=members,
                      note="LatentDiffusion.training_step with its configured optimizer")


def comparisons(batch_size: int, device: torch.device) -> Iterator[Comparison]:
    """Built one at a time, so that only one pair's models are in memory."""
    warnings.filterwarnings("ignore", message=".*self.log.*")  # training_step outside a Trainer
    with TemporaryDirectory() as cache_dir:
        for name, overrides in (("digits, latent DiT", []), ("shapes, frozen text tower", SHAPES_TEXT),
                                ("shapes, ViT-B-32 text tower", VIT_B_32_TEXT)):
            yield pair(f"{name}: cache", ("cache", overrides + ["data.cache=true"]),
                       ("no cache", overrides + ["data.cache=false"]), batch_size, cache_dir, device)
        yield pair("digits denoiser", ("unet", ["model=unet", "data.cache=true"]), ("dit", ["data.cache=true"]),
                   batch_size, cache_dir, device)
