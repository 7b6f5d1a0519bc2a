"""Content hashes of modules: which frozen weights a cache or a checkpoint was made with."""

from __future__ import annotations

import hashlib

import torch


def update_with_module(digest, module: torch.nn.Module) -> None:
    """Feed the module's class, tensor names, shapes, dtypes and values into a hashlib digest."""
    digest.update(type(module).__qualname__.encode())
    update_with_tensors(digest, module.state_dict())


def update_with_tensors(digest, tensors: dict[str, torch.Tensor]) -> None:
    """Feed tensor names, shapes, dtypes and values into a hashlib digest."""
    for name, tensor in sorted(tensors.items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())


def module_fingerprint(module: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    update_with_module(digest, module)
    return digest.hexdigest()[:20]


def tensors_fingerprint(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    update_with_tensors(digest, tensors)
    return digest.hexdigest()[:20]
