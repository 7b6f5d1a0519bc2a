"""Command-line keys that moved: an old spelling gets one line naming the new one, not Hydra's struct error."""

from __future__ import annotations

RENAMED = {
    "diffusion.lr": "optimizer.lr",
    "diffusion.weight_decay": "optimizer.weight_decay",
    "diffusion.betas": "optimizer.betas",
    "diffusion.warmup_steps": "lr_scheduler.warmup_steps",
}


def renamed_overrides(arguments: list[str]) -> list[str]:
    """One message per argument that uses a moved key."""
    messages = []
    for argument in arguments:
        key = argument.split("=", 1)[0].lstrip("+~")
        if key in RENAMED:
            messages.append(f"{key} is now {RENAMED[key]}: write {argument.replace(key, RENAMED[key], 1)}")
    return messages
