"""Write a trained run's networks in diffusers' format, so that results leave the project.

    python export.py run=DIR [part=denoiser|autoencoder] [out=DIR] [checkpoint=last] [ema=true] [merge=false]

The denoiser (a `unet_sd`-layout UNet, or a DiT with its class table) goes to `OUT/unet` or
`OUT/transformer`, the SD autoencoder to `OUT/vae`, each a directory that diffusers'
`from_pretrained` loads. The EMA weights are written when the checkpoint has them (`ema=false`: raw).
A `finetune=lora` run's denoiser is its adapter: `OUT/pytorch_lora_weights.safetensors`, which diffusers'
`load_lora_weights` reads; `merge=true` writes the network with the adapter merged into it instead.

Time: diffusers' `timestep` is the time the run's network sees, `model.time_scale` times the
schedule's `model_input(x_t, t)` time (for the flow schedule: 1000 t). The denoiser's config.json
says so under `_ldm_time_scale` and `_ldm_timestep` (diffusers ignores keys that start with "_"), and
the command prints it. A DiT's class table goes into diffusers' table as the DiT adds it to its time
embedding (through model.vector_embedder); its last row is the null class of guidance.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from ldm.autoencoders.sd_vae import SDAutoencoder
from ldm.finetune.adapters import merge_adapters, tuner_layers
from ldm.finetune.files import export_lora
from ldm.models.dit import DiT
from ldm.models.unet import UNet
from ldm.run.build import build_diffusion
from ldm.run.load import build_run, read_run_config, run_checkpoint
from ldm.utils.errors import UserError, reported_user_errors
from ldm.weights import dit, unet, vae

PARTS = ("denoiser", "autoencoder")


def timestep_note(schedule, time_scale: float) -> dict[str, str]:
    """What a diffusers caller passes as `timestep` (and `sample`), in the schedule's own terms."""
    times = torch.tensor([1.0, 0.5], dtype=torch.float64)
    seen = schedule.model_input(torch.ones(2, 1, 1, 1, dtype=torch.float64), times)[1] * time_scale
    name = type(schedule).__name__
    return {"_ldm_timestep": f"timestep = {time_scale:g} * schedule.model_input(x_t, t)[1] of {name} "
                             f"(sample = schedule.model_input(x_t, t)[0]); at t=1: {seen[0].item():g}, "
                             f"at t=0.5: {seen[1].item():g}"}


def class_table(conditioner):
    """The conditioner's class embedder when it makes the whole condition vector (None otherwise)."""
    vectors = [e for e in conditioner.embedders if "vector" in e.fields]
    tables = [e for e in vectors if hasattr(e, "embedding")]
    if len(vectors) > 1 or not tables:
        return None
    return tables[0]


def exporter(part: str, module):
    """(subfolder, function writing the part to a directory) for the network class of a run's part."""
    if part == "denoiser":
        network = module.denoiser
        if isinstance(network, UNet):
            note = timestep_note(module.schedule, float(network.settings["time_scale"]))
            return "unet", lambda out: unet.to_diffusers(network, out, note)
        if isinstance(network, DiT):
            note = timestep_note(module.schedule, float(network.t_embedder.time_scale))
            table = class_table(module.conditioner)
            return "transformer", lambda out: dit.to_diffusers(network, table, out, note)
        raise UserError(f"part=denoiser: {type(network).__name__} has no diffusers format here (UNet and DiT do)")
    network = module.autoencoder
    if isinstance(network, SDAutoencoder):
        scale, shift = float(module.latent_scale), float(module.latent_shift)
        return "vae", lambda out: vae.to_diffusers(network, out, scale_factor=scale, shift_factor=shift)
    raise UserError(f"part=autoencoder: {type(network).__name__} has no diffusers format (autoencoder=sd_vae has)")


def export(run: str, part: str = "denoiser", out: str | None = None, checkpoint: str = "last",
           ema: bool = True, merge: bool = False) -> Path:
    if part not in PARTS:
        raise UserError(f"part={part}: give one of {', '.join(PARTS)}")
    run_dir = Path(run)
    cfg = read_run_config(run_dir)
    module = build_run(cfg, run_dir, checkpoint, "cpu") if ema else _raw(cfg, run_dir, checkpoint)
    target = Path(out) if out else run_dir / "diffusers"
    adapted = part == "denoiser" and bool(tuner_layers(module.denoiser))
    if merge and not adapted:
        raise UserError(f"merge=true: run={run} has no adapters to merge (a finetune=lora run has); its "
                        f"{part} is written whole without it")
    if adapted and not merge:
        return export_lora(module.denoiser, target)
    if adapted:
        merge_adapters(module.denoiser)
    subfolder, write = exporter(part, module)
    return write(target / subfolder)


def _raw(cfg, run_dir: Path, checkpoint: str):
    module = build_diffusion(cfg)
    module.load_checkpoint(run_checkpoint(run_dir, checkpoint), ema=False)
    return module.eval()


def read_note(path: Path) -> str | None:
    config = path / "config.json"
    return json.loads(config.read_text()).get("_ldm_timestep") if config.is_file() else None


def parse(argv: list[str]) -> dict[str, str | bool]:
    args: dict[str, str | bool] = {}
    for item in argv:
        key, sep, value = item.partition("=")
        if not sep or key not in ("run", "part", "out", "checkpoint", "ema", "merge"):
            raise UserError(f"{item}: give key=value with key one of run, part, out, checkpoint, ema, merge")
        if key in ("ema", "merge") and value.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise UserError(f"{item}: {key} takes true or false")
        args[key] = value.lower() in ("true", "1", "yes") if key in ("ema", "merge") else value
    if "run" not in args:
        raise UserError("run=DIR is missing: the training run directory to export from")
    return args


def main(argv: list[str] | None = None) -> None:
    with reported_user_errors():
        path = export(**parse(sys.argv[1:] if argv is None else argv))
    print(f"wrote {path}")
    note = read_note(path)
    if note:
        print(f"diffusers: {note} (config.json: _ldm_timestep)")
