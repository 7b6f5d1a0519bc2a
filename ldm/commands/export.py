"""Write a trained run's networks in diffusers' format, so that results leave the project.

    python export.py run=DIR [part=denoiser|autoencoder] [out=DIR] [checkpoint=last] [ema=true]

The denoiser (a `unet_sd`-layout UNet, or a DiT with its class table) goes to `OUT/unet` or
`OUT/transformer`, the SD autoencoder to `OUT/vae`, each a directory that diffusers'
`from_pretrained` loads. The EMA weights are written when the checkpoint has them (`ema=false`: raw).
"""

from __future__ import annotations

import sys
from pathlib import Path

from ldm.autoencoders.sd_vae import SDAutoencoder
from ldm.models.dit import DiT
from ldm.models.unet import UNet
from ldm.run.build import build_diffusion
from ldm.run.load import build_run, read_run_config, run_checkpoint
from ldm.utils.errors import UserError, reported_user_errors
from ldm.weights import dit, unet, vae

PARTS = ("denoiser", "autoencoder")


def exporter(part: str, module):
    """(subfolder, function writing the part to a directory) for the network class of a run's part."""
    if part == "denoiser":
        network = module.denoiser
        if isinstance(network, UNet):
            return "unet", lambda out: unet.to_diffusers(network, out)
        if isinstance(network, DiT):
            tables = [e for e in module.conditioner.embedders if hasattr(e, "embedding")]
            return "transformer", lambda out: dit.to_diffusers(network, tables[0] if tables else None, out)
        raise UserError(f"part=denoiser: {type(network).__name__} has no diffusers format here (UNet and DiT do)")
    network = module.autoencoder
    if isinstance(network, SDAutoencoder):
        scale, shift = float(module.latent_scale), float(module.latent_shift)
        return "vae", lambda out: vae.to_diffusers(network, out, scale_factor=scale, shift_factor=shift)
    raise UserError(f"part=autoencoder: {type(network).__name__} has no diffusers format (autoencoder=sd_vae has)")


def export(run: str, part: str = "denoiser", out: str | None = None, checkpoint: str = "last",
           ema: bool = True) -> Path:
    if part not in PARTS:
        raise UserError(f"part={part}: give one of {', '.join(PARTS)}")
    run_dir = Path(run)
    cfg = read_run_config(run_dir)
    module = build_run(cfg, run_dir, checkpoint, "cpu") if ema else _raw(cfg, run_dir, checkpoint)
    subfolder, write = exporter(part, module)
    target = Path(out) if out else run_dir / "diffusers"
    return write(target / subfolder)


def _raw(cfg, run_dir: Path, checkpoint: str):
    module = build_diffusion(cfg)
    module.load_checkpoint(run_checkpoint(run_dir, checkpoint), ema=False)
    return module.eval()


def parse(argv: list[str]) -> dict[str, str | bool]:
    args: dict[str, str | bool] = {}
    for item in argv:
        key, sep, value = item.partition("=")
        if not sep or key not in ("run", "part", "out", "checkpoint", "ema"):
            raise UserError(f"{item}: give key=value with key one of run, part, out, checkpoint, ema")
        args[key] = value.lower() not in ("false", "0", "no") if key == "ema" else value
    if "run" not in args:
        raise UserError("run=DIR is missing: the training run directory to export from")
    return args


def main(argv: list[str] | None = None) -> None:
    with reported_user_errors():
        path = export(**parse(sys.argv[1:] if argv is None else argv))
    print(f"wrote {path}")
