"""The offline cache: frozen encoders run once over the data set, training reads their outputs.

Stored per item: the autoencoder's posterior (mean and std, so each step still draws a fresh latent)
and the outputs of every frozen embedder. The cache file is keyed by a hash of the data config,
the encoder configs and their weights, so changing any of them builds a new one.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Dataset

from ldm.conditioners.conditioner import Conditioner, cache_key

log = logging.getLogger(__name__)


def data_identity(data_cfg) -> dict:
    """The part of a data config that determines the data itself (what the cache key hashes)."""
    from omegaconf import OmegaConf

    loading = {"batch_size", "val_batch_size", "num_workers", "cache", "cache_dir"}
    return {k: v for k, v in OmegaConf.to_container(data_cfg, resolve=True).items() if k not in loading}


def _hash_module(digest, module: torch.nn.Module) -> None:
    digest.update(type(module).__qualname__.encode())
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())


def cache_fingerprint(data_config: dict, split: str, autoencoder: torch.nn.Module,
                      frozen: dict[int, torch.nn.Module]) -> str:
    """Hash of what the cached tensors depend on: data, split, encoders' classes and weights."""
    digest = hashlib.sha256()
    digest.update(json.dumps({"data": data_config, "split": split}, sort_keys=True, default=str).encode())
    _hash_module(digest, autoencoder)
    for index, embedder in sorted(frozen.items()):
        digest.update(f"embedder{index}:{embedder.input_key}:{embedder.fields}".encode())
        _hash_module(digest, embedder)
    return digest.hexdigest()[:20]


def frozen_embedders(conditioner: Conditioner) -> dict[int, torch.nn.Module]:
    """The embedders whose outputs go in the cache; a trainable encoder cannot be cached."""
    for i, embedder in enumerate(conditioner.embedders):
        if embedder.offline and embedder.trainable:
            raise ValueError(f"conditioner.embedders.{i} ({type(embedder).__name__}) is trainable, so its outputs "
                             "cannot be cached: set data.cache=false, or freeze it (trainable: false)")
    return {i: e for i, e in enumerate(conditioner.embedders) if e.offline}


class CachedDataset(Dataset):
    """The base dataset's items without `image`, plus `latent_mean`, `latent_std` and cached condition outputs."""

    def __init__(self, base: Dataset, tensors: dict[str, torch.Tensor]):
        self.base, self.tensors = base, tensors
        self.length = len(next(iter(tensors.values())))
        if self.length != len(base):
            raise ValueError(f"cache holds {self.length} items but the dataset has {len(base)}")

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict:
        item = {k: v for k, v in self.base[i].items() if k != "image"}
        item.update({k: v[i] for k, v in self.tensors.items()})
        return item


@torch.no_grad()
def compute_cache(dataset: Dataset, autoencoder, frozen: dict[int, torch.nn.Module], batch_size: int,
                  device) -> dict[str, torch.Tensor]:
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    chunks: dict[str, list[torch.Tensor]] = {}
    for batch in loader:
        mean, std = autoencoder.encode_posterior(batch["image"].to(device))
        outputs = {"latent_mean": mean, "latent_std": std}
        for index, embedder in frozen.items():
            inputs = batch[embedder.input_key]
            outputs.update({cache_key(index, k): v for k, v in embedder(inputs).items()})
        for key, value in outputs.items():
            chunks.setdefault(key, []).append(value.cpu())
    return {key: torch.cat(values).contiguous() for key, values in chunks.items()}


def cached_dataset(dataset: Dataset, split: str, data_config: dict, autoencoder, conditioner: Conditioner,
                   cache_dir: str | Path, batch_size: int = 256, device="cpu") -> CachedDataset:
    """Load this split's cache if its fingerprint matches, else compute and write it."""
    frozen = frozen_embedders(conditioner)
    key = cache_fingerprint(data_config, split, autoencoder, frozen)
    path = Path(cache_dir) / f"{split}-{key}.safetensors"
    if path.is_file():
        log.info("reading cache %s", path)
        tensors = load_file(str(path))
    else:
        log.info("building cache %s", path)
        tensors = compute_cache(dataset, autoencoder, frozen, batch_size, device)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file(tensors, str(tmp))
        tmp.replace(path)  # atomic: a crash never leaves a half-written cache under the real name
    return CachedDataset(dataset, tensors)
