"""Optimizer parameter groups and learning-rate schedules (config groups `optimizer` and `lr_scheduler`)."""

from __future__ import annotations

import math

import torch
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.utilities import GradClipAlgorithmType
from torch import nn

# Only the weights of these layers are decayed: norms, biases, embedding tables (class and null rows
# included) and position tables are not, as in GPT-2/DiT practice.
DECAYED_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d)


def parameter_groups(module: nn.Module) -> list[dict]:
    """Two groups: layer weights (the optimizer's weight_decay applies) and every other trainable one (none)."""
    decayed: dict[int, nn.Parameter] = {}
    for layer in module.modules():
        if isinstance(layer, DECAYED_LAYERS) and layer.weight.requires_grad:
            decayed[id(layer.weight)] = layer.weight
    rest = [p for p in module.parameters() if p.requires_grad and id(p) not in decayed]
    groups = [{"params": list(decayed.values())},
              {"params": rest, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def make_optimizer(factory, groups: list[dict], trainer=None) -> torch.optim.Optimizer:
    """`factory(groups)`, the optimizer config's partial; where the config leaves the implementation open
    (`fused` and `foreach` both null) and every parameter's device has a fused kernel, the fused one: the same
    update in one pass per tensor, ~3x faster than torch's default loop over tensors on a CPU.

    Not under fp16 autocast with gradient clipping: Lightning clips before its loss-scale unscaling, which a
    fused step does itself, and refuses the pair (bf16 has no loss scale; see `clip_gradients`)."""
    keywords = getattr(factory, "keywords", {})
    if keywords.get("fused", False) is not None or keywords.get("foreach", False) is not None:
        return factory(groups)
    if trainer is not None and _scales_loss(trainer) and trainer.gradient_clip_val:
        return factory(groups)
    try:
        return factory(groups, fused=True)
    except RuntimeError:  # a device or parameter type without the fused kernel
        return factory(groups)


def _scales_loss(trainer) -> bool:
    return getattr(trainer.precision_plugin, "scaler", None) is not None


def clip_gradients(module, optimizer: torch.optim.Optimizer, value: float | None, algorithm: str | None) -> None:
    """The LightningModule's gradient clipping. Lightning's mixed-precision plugin refuses to clip for a fused
    optimizer, in case its step unscales the loss (only fp16's does); without a loss scale (bf16-mixed) the
    plugin's parent clips instead, which is how Lightning clips for every other optimizer."""

    plugin = module.trainer.precision_plugin
    if value and isinstance(plugin, MixedPrecision) and not _scales_loss(module.trainer):
        super(MixedPrecision, plugin).clip_gradients(optimizer, value, GradClipAlgorithmType(algorithm or "norm"))
        return
    module.clip_gradients(optimizer, gradient_clip_val=value, gradient_clip_algorithm=algorithm)


class FusedClipping:
    """Mixin for a LightningModule: gradient clipping through `clip_gradients`, so that it works with the fused
    optimizer that `make_optimizer` builds under bf16."""

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        clip_gradients(self, optimizer, gradient_clip_val, gradient_clip_algorithm)


class Warmup:
    """LR multiplier: linear warmup over `warmup_steps`, then constant, or cosine down to `final_ratio`."""

    def __init__(self, warmup_steps: int = 0, total_steps: int | None = None, final_ratio: float = 1.0):
        if warmup_steps < 0:
            raise ValueError(f"lr_scheduler.warmup_steps must be >= 0, got {warmup_steps}")
        if final_ratio != 1.0 and (total_steps is None or total_steps <= warmup_steps):
            raise ValueError(f"lr_scheduler.total_steps ({total_steps}) must exceed warmup_steps ({warmup_steps}) "
                             "for a decaying schedule")
        self.warmup_steps, self.total_steps, self.final_ratio = warmup_steps, total_steps, final_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.final_ratio == 1.0:
            return 1.0
        progress = min(1.0, (step - self.warmup_steps) / (self.total_steps - self.warmup_steps))
        return self.final_ratio + (1 - self.final_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def constant(optimizer: torch.optim.Optimizer, warmup_steps: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, Warmup(warmup_steps))


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                  final_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, Warmup(warmup_steps, total_steps, final_ratio))


def earlier_names(name: str) -> list[str]:
    """The parameter names a checkpoint of the earlier layout holds for `name`: self-attention's fused
    to_qkv was to_q and to_kv, stacked in that order."""
    if ".to_qkv." not in name:
        return [name]
    return [name.replace(".to_qkv.", ".to_q."), name.replace(".to_qkv.", ".to_kv.")]


def upgraded_optimizer_state(module: nn.Module, state: dict) -> dict:
    """An optimizer state dict saved for `module` in the earlier attention layout, rewritten for its parameters
    now (moments of to_q and to_kv stacked like the weights); a state of the current layout comes back as it is."""
    names = {id(p): name for name, p in module.named_parameters()}
    groups = [[names[id(p)] for p in group["params"]] for group in parameter_groups(module)]
    saved = state["param_groups"]
    earlier = [[old for name in group for old in earlier_names(name)] for group in groups]
    if len(saved) != len(groups) or [len(g["params"]) for g in saved] == [len(g) for g in groups]:
        return state
    if [len(g["params"]) for g in saved] != [len(g) for g in earlier]:
        raise ValueError("the checkpoint's optimizer state has groups of "
                         f"{[len(g['params']) for g in saved]} parameters, which fit neither this model's "
                         f"{[len(g) for g in groups]} nor its earlier attention layout's {[len(g) for g in earlier]}")
    moments, param_groups, index = {}, [], 0
    for group, old_group, saved_group in zip(groups, earlier, saved, strict=True):
        position = dict(zip(old_group, saved_group["params"], strict=True))
        for name in group:
            parts = [state["state"][position[old]] for old in earlier_names(name) if position[old] in state["state"]]
            if parts:  # scalars (the step) are shared; tensors are stacked as the weights are
                moments[index] = {key: torch.cat([part[key] for part in parts]) if torch.is_tensor(value) and value.ndim
                                  else value
                                  for key, value in parts[0].items()}
            index += 1
        param_groups.append({**saved_group, "params": list(range(index - len(group), index))})
    return {"state": moments, "param_groups": param_groups}


def optimizers_with_schedule(module) -> torch.optim.Optimizer | dict:
    """`configure_optimizers` of a task with `make_optimizer` and an optional per-step `make_lr_scheduler`."""
    optimizer = make_optimizer(module.make_optimizer, parameter_groups(module), module._trainer)
    if module.make_lr_scheduler is None:
        return optimizer
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": module.make_lr_scheduler(optimizer),
                                                     "interval": "step"}}
