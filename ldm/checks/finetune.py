"""Checks of a fine-tune before any work: what it targets, where its base comes from, and LoRA sources at sampling.

The targets are matched against the module names of the configured denoiser, built on the meta device (no memory,
no weights read); a LoRA file is matched the same way against the denoiser it is put on.
"""

from __future__ import annotations

from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from ldm.checks.findings import UNKNOWN, Findings, is_number
from ldm.checks.other_runs import stored_config
from ldm.finetune import LoRA, Partial
from ldm.finetune.files import fit_problems
from ldm.finetune.lora import ADAPTERS
from ldm.run.adapters import is_run
from ldm.utils.errors import UserError
from ldm.weights.lora import read_lora

FULL = "ldm.finetune.Full"
WITH_BASE = {"ldm.finetune.LoRA": "lora", "ldm.finetune.lora.LoRA": "lora", "ldm.finetune.Partial": "partial",
             "ldm.finetune.partial.Partial": "partial"}


def meta_denoiser(model_cfg: DictConfig):
    """The configured denoiser's modules without weights (None when the model config does not build: the other
    checks name why)."""
    try:
        with torch.device("meta"):
            return hydra.utils.instantiate(model_cfg, weights=None, compile=False)
    except Exception:  # noqa: BLE001 - a model config that cannot build is reported by the checks of its keys
        return None


def finetune_problems(found: Findings) -> None:
    """`finetune=lora|partial`: its settings, its targets against the denoiser's modules, and its base."""
    target = found.value("finetune._target_", FULL)
    kind = WITH_BASE.get(target)
    if kind is None:
        return
    if kind == "lora":
        adapter = found.value("finetune.adapter", "lora")
        if adapter not in (*ADAPTERS, UNKNOWN):
            found.add(f"finetune.adapter={adapter} is not an adapter: use one of {', '.join(ADAPTERS)}")
        if found.value("finetune.use_dora") is True and adapter != "lora":
            found.add(f"finetune.use_dora=true with finetune.adapter={adapter}: DoRA is a LoRA variant; use "
                      "finetune.adapter=lora, or finetune.use_dora=false")
    if not found.value("model.weights") and not found.value("init_from"):
        found.add(f"finetune={kind} fine-tunes a base, and there is none: give model.weights=FILE (published weights) "
                  "or init_from=RUN_DIR (a finished run), or train every weight from scratch with finetune=full")
    targets = found.value("finetune.targets")
    if targets is UNKNOWN or not OmegaConf.is_dict(found.node("model")):
        return
    denoiser = meta_denoiser(found.cfg.model)
    if denoiser is None:
        return
    try:
        (LoRA(targets=targets).layers if kind == "lora" else Partial(targets).apply)(denoiser)
    except UserError as error:
        for line in error.problems:
            found.add(line, key="finetune.targets")


def init_from_kind_problems(found: Findings) -> None:
    """init_from names a run whose checkpoints hold its whole network (a LoRA or partial run's hold a part)."""
    init_from = found.value("init_from")
    if init_from in (None, UNKNOWN) or "init_from" in found.wrong:
        return
    stored = stored_config(Path(str(init_from)).expanduser())
    kind = WITH_BASE.get(OmegaConf.select(stored, "finetune._target_", default=FULL)) if stored is not None else None
    if kind is not None:
        found.add(f"init_from={init_from} is a finetune={kind} run, whose checkpoints hold only what it trained: "
                  f"export its merged network (python export.py run={init_from} merge=true) and start from that with "
                  "model.weights=, or fine-tune its own base", key="init_from")


def lora_source_problems(found: Findings, denoiser_of) -> None:
    """sample.py's `lora=[...]` and `lora_scale=[...]`: sources that exist, one scale per source, files that fit.

    `denoiser_of()` gives the sampled model's denoiser built on the meta device (None when unknown)."""
    sources, scales = found.value("lora", []), found.value("lora_scale", [])
    if sources in (None, UNKNOWN) or scales in (None, UNKNOWN):
        return
    if not isinstance(sources, list) or not isinstance(scales, list):
        found.add(f"lora={sources} lora_scale={scales}: give lists, e.g. lora=[style.safetensors] lora_scale=[0.8]")
        return
    if scales and len(scales) != len(sources):
        found.add(f"lora_scale={scales} has {len(scales)} weights for {len(sources)} LoRAs: give one per entry of "
                  "lora=, or none (1 each)")
    for scale in scales:
        if not is_number(scale):
            found.add(f"lora_scale={scales}: {scale!r} is not a number (the weight of a LoRA, e.g. 0.8)")
    denoiser = None
    for source in sources:
        path = Path(str(source)).expanduser()
        if not path.exists():
            found.add(f"lora={source}: no such file or directory; give a LoRA file (.safetensors), a diffusers or "
                      "peft LoRA directory, or a finetune=lora run directory")
            continue
        if is_run(path):
            run = stored_config(path)
            if OmegaConf.select(run, "finetune._target_", default=FULL) not in ("ldm.finetune.LoRA",
                                                                                 "ldm.finetune.lora.LoRA"):
                found.add(f"lora={source} is a run directory, but not of a finetune=lora run: lora= takes LoRA files "
                          "and finetune=lora runs")
            continue
        denoiser = denoiser if denoiser is not None else denoiser_of()
        try:
            lora = read_lora(path)
            problems = fit_problems(denoiser, lora) if denoiser is not None else []
        except UserError as error:
            problems = error.problems
        for line in problems:
            found.add(line)
