"""Adapters put on a model for sampling: `sample.py lora=[FILE_OR_RUN,...] lora_scale=[...]`.

Each source is a LoRA file (diffusers', peft's or kohya's format, ldm.finetune.files) or a `finetune=lora` run
directory (its EMA adapter). They act together with the model's own adapter, if it has one: the output is the
base's plus the sum of scale * each adapter's update, as diffusers' `set_adapters(names, weights)` computes it.
A run's adapter is refused on another base than the one it was trained on (by hash).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import hydra

from ldm.finetune.adapters import activate, adapter_names, base_fingerprint, renamed_adapter
from ldm.finetune.files import import_lora
from ldm.finetune.lora import ADAPTER_NAME, LoRA
from ldm.run.load import read_run_config, run_checkpoint
from ldm.utils.checkpoint import EMA_KEY, CheckpointError
from ldm.utils.errors import UserError
from ldm.utils.fingerprint import tensors_fingerprint

RUN_CONFIG = Path(".hydra") / "config.yaml"


def is_run(source: str | Path) -> bool:
    return (Path(source).expanduser() / RUN_CONFIG).is_file()


def add_adapters(module, sources: Sequence[str], scales: Sequence[float] = (), trusted: Iterable[str] = ()) -> None:
    """Add every source to `module.denoiser` as its own adapter and make them act together with their scales
    (1 where `scales` is empty)."""
    denoiser = module.denoiser
    active = {name: 1.0 for name in adapter_names(denoiser)}  # the run's own adapter
    scales = list(scales) or [1.0] * len(sources)
    for index, (source, scale) in enumerate(zip(sources, scales, strict=True)):
        name = f"lora_{index}"
        if is_run(source):
            add_run_adapter(module, Path(source).expanduser(), name, trusted)
        else:
            import_lora(denoiser, source, name)
        active[name] = float(scale)
    activate(denoiser, active)


def base_fingerprints(module) -> dict[str, str]:
    """The module's denoiser and conditioner weights hashed as a fine-tune's base is (LatentDiffusion.adapt)."""
    frozen = tuple(f"{name}." for name in module.conditioner.frozen_parts())
    conditioner = {key: value for key, value in module.conditioner.state_dict().items() if not key.startswith(frozen)}
    found = {"base.denoiser": base_fingerprint(module.denoiser)}
    if conditioner:
        found["base.conditioner"] = tensors_fingerprint(conditioner)
    return found


def add_run_adapter(module, run_dir: Path, name: str, trusted: Iterable[str] = ()) -> None:
    """A finetune=lora run's adapter (its EMA weights once the EMA started), checked against this model's base."""
    cfg = read_run_config(run_dir, trusted)
    finetune = hydra.utils.instantiate(cfg.finetune) if cfg.get("finetune") else None
    if not isinstance(finetune, LoRA):
        kind = cfg.get("finetune", {}).get("_target_", "ldm.finetune.Full").rsplit(".", 1)[-1].lower()
        raise UserError(f"lora={run_dir} is a finetune={kind} run: lora= takes LoRA files and finetune=lora runs")
    checkpoint = run_checkpoint(run_dir, "last")
    theirs, ours = checkpoint.get("frozen_parts") or {}, base_fingerprints(module)
    for part in sorted(key for key in theirs if key.startswith("base.")):
        if theirs[part] != ours.get(part):
            raise CheckpointError(f"lora={run_dir} was trained on another base than this model's: '{part}' has hash "
                                  f"{theirs[part]} there and {ours.get(part)} here; sample it with the run or "
                                  "weights it was fine-tuned from")
    weights = {**checkpoint["state_dict"], **(checkpoint.get(EMA_KEY) or {})}
    weights = {key[len("denoiser."):]: value for key, value in weights.items() if key.startswith("denoiser.")}
    finetune.apply(module.denoiser, adapter_name=name)
    renamed = renamed_adapter(weights, ADAPTER_NAME, name)
    own = module.denoiser.state_dict()
    missing = sorted(key for key in own if name in key.split(".") and key not in renamed)
    if missing or set(renamed) - set(own):
        raise CheckpointError(f"lora={run_dir}: its checkpoint's adapter does not fit its own config (first "
                              f"missing: {missing[:1]}, unknown: {sorted(set(renamed) - set(own))[:1]})")
    module.denoiser.load_state_dict(renamed, strict=False)
