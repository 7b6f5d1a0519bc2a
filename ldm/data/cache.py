"""The offline cache: frozen encoders run once over the data set, training reads their outputs.

Stored per item: the autoencoder's posterior (mean and std, so each step still draws a fresh latent)
for every variant of the cacheable augmentations, and the outputs of every frozen embedder; the
batch keys are those of ldm/contracts/batch.py. Only what is deterministic is stored: any other random
augmentation is refused. The file name hashes the data config, the data's content (when the
dataset can describe it), the encoders' classes and weights, and CACHE_FORMAT, so a change to any
of them builds a new file. Training from the cache reads the dataset's `metadata(i)`, never an image.
The same tensors go to litdata shards on disk instead, for data larger than memory: ldm/data/shards.py.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms.v2 import functional as TF

from ldm.conditioners.conditioner import Conditioner
from ldm.contracts.batch import IMAGE, LATENT_MEAN, LATENT_STD, condition_key
from ldm.data import cache_file
from ldm.data.cache_file import InvalidCache
from ldm.utils.fingerprint import update_with_module

log = logging.getLogger(__name__)

#: bump when what a cache file holds or how it is laid out changes: older files are then never read
CACHE_FORMAT = 2

#: random augmentations the cache can hold in full: the variants of each, all encoded; training
#: draws one per item per step (as DiT's and fast-DiT's feature extraction do for flips)
CACHEABLE = {"flip": (lambda image: image, TF.horizontal_flip)}


def data_identity(data_cfg) -> dict:
    """The part of a data config that determines the data itself (what the cache key hashes)."""
    loading = {"batch_size", "val_batch_size", "global_batch_size", "num_workers", "cache", "cache_dir"}
    return {k: v for k, v in OmegaConf.to_container(data_cfg, resolve=True).items() if k not in loading}


def cache_fingerprint(data_config: dict, split: str, dataset: Dataset, autoencoder: torch.nn.Module,
                      frozen: dict[int, torch.nn.Module]) -> str:
    """Hash of what the cached tensors depend on: format, data config and content, encoders' weights."""
    content = dataset.content_fingerprint() if hasattr(dataset, "content_fingerprint") else None
    digest = hashlib.sha256()
    digest.update(json.dumps({"format": CACHE_FORMAT, "data": data_config, "split": split, "content": content},
                             sort_keys=True, default=str).encode())
    update_with_module(digest, autoencoder)
    for index, embedder in sorted(frozen.items()):
        digest.update(f"embedder{index}:{embedder.input_key}:{embedder.fields}".encode())
        update_with_module(digest, embedder)
    return digest.hexdigest()[:20]


def frozen_embedders(conditioner: Conditioner) -> dict[int, torch.nn.Module]:
    """The embedders whose outputs go in the cache; a trainable encoder cannot be cached."""
    for i, embedder in enumerate(conditioner.embedders):
        if embedder.offline and embedder.trainable:
            raise ValueError(f"conditioner.embedders.{i} ({type(embedder).__name__}) is trainable, so its outputs "
                             "cannot be cached: set data.cache=false, or freeze it (trainable: false)")
    return {i: e for i, e in enumerate(conditioner.embedders) if e.offline}


def cacheable_variants(dataset: Dataset) -> tuple[Dataset, list]:
    """The dataset without its random augmentations, and the image variants to store for each item.

    Refuses an augmentation that is on and not in CACHEABLE: the cache would freeze one random draw."""
    enabled = [key for key, on in getattr(dataset, "augmentations", {}).items() if on]
    for key in enabled:
        if key not in CACHEABLE:
            raise ValueError(f"data.{key} is a random augmentation, and data.cache=true would store one draw of it "
                             f"for every epoch: set data.{key}=false or data.cache=false (the cache can store "
                             f"these augmentations in every variant: {', '.join(CACHEABLE)})")
    plain = dataset.without_augmentation() if enabled else dataset
    # with none enabled, the product is one empty chain: the image itself
    return plain, [_compose(chain) for chain in itertools.product(*(CACHEABLE[key] for key in enabled))]


def _compose(functions):
    def variant(image):
        for function in functions:
            image = function(image)
        return image
    return variant


def check_deterministic(dataset: Dataset, draws: int = 3) -> None:
    """Refuse a dataset whose first image depends on the random state (an undeclared random transform)."""
    images = []
    for seed in range(draws):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            images.append(dataset[0][IMAGE])
    if any(not torch.equal(images[0], image) for image in images[1:]):
        raise ValueError(f"{type(dataset).__name__}[0] gives a different image under different random seeds, so "
                         "the cache would freeze one random draw: set data.cache=false, or declare the transform "
                         "in the dataset's `augmentations` and turn it off")


def _reads_image(embedder: torch.nn.Module) -> bool:
    """An image embedder's outputs differ per variant, so they are stored per variant like the latents."""
    return embedder.input_key == IMAGE


class _BuildProgress:
    """A log line every `fraction` of the items or every `seconds` (a large data set takes hours to encode)."""

    def __init__(self, total: int, fraction: float = 0.1, seconds: float = 10.0):
        self.total, self.seconds, self.done = total, seconds, 0
        self.every_items = max(1, math.ceil(total * fraction))
        self.start = self.last_time = time.monotonic()
        self.next_items = self.every_items

    def update(self, items: int) -> None:
        self.done += items
        now = time.monotonic()
        if self.done >= self.next_items or now - self.last_time >= self.seconds or self.done == self.total:
            rate = self.done / max(now - self.start, 1e-9)
            log.info("cache: %d/%d items (%.0f%%), %.1f items/s", self.done, self.total,
                     100 * self.done / max(self.total, 1), rate)
            self.last_time = now
            self.next_items = (self.done // self.every_items + 1) * self.every_items


@torch.no_grad()
def encode_batches(dataset: Dataset, variants: list, autoencoder, frozen: dict[int, torch.nn.Module],
                   batch_size: int, num_workers: int = 0, device="cpu") -> Iterator[dict[str, torch.Tensor]]:
    """Each batch's tensors in dataset order, on the CPU; what depends on the image is (B, num_variants, ...)."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    progress = _BuildProgress(len(dataset))
    for batch in loader:
        per_variant: dict[str, list[torch.Tensor]] = {}
        images = batch[IMAGE].to(device)
        for variant in variants:
            image = variant(images)
            mean, std = autoencoder.encode_posterior(image)
            per_variant.setdefault(LATENT_MEAN, []).append(mean)
            per_variant.setdefault(LATENT_STD, []).append(std)
            for index, embedder in frozen.items():
                if _reads_image(embedder):
                    for out, value in embedder(image).items():
                        per_variant.setdefault(condition_key(index, out), []).append(value)
        outputs = {key: torch.stack(values, dim=1) for key, values in per_variant.items()}
        for index, embedder in frozen.items():
            if not _reads_image(embedder):
                outputs.update({condition_key(index, out): v for out, v in embedder(batch[embedder.input_key]).items()})
        progress.update(len(images))
        yield {key: value.cpu() for key, value in outputs.items()}


def compute_cache(dataset: Dataset, variants: list, autoencoder, frozen: dict[int, torch.nn.Module],
                  batch_size: int, num_workers: int = 0, device="cpu") -> dict[str, torch.Tensor]:
    """Every item's tensors; what depends on the image has shape (N, num_variants, ...), the rest (N, ...)."""
    chunks: dict[str, list[torch.Tensor]] = {}
    for outputs in encode_batches(dataset, variants, autoencoder, frozen, batch_size, num_workers, device):
        for key, value in outputs.items():
            chunks.setdefault(key, []).append(value)
    return {key: torch.cat(values).contiguous() for key, values in chunks.items()}


class CachedDataset(Dataset):
    """The base dataset's `metadata(i)` plus its cached tensors; one stored variant drawn per item per call."""

    def __init__(self, base: Dataset, tensors: dict[str, torch.Tensor], variant_keys: list[str]):
        self.base, self.tensors, self.variant_keys = base, tensors, frozenset(variant_keys)
        self.num_variants = tensors[LATENT_MEAN].shape[1]

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict:
        item = self.base.metadata(i)
        # drawing only when there is a choice keeps the random stream of an unaugmented run untouched
        variant = int(torch.randint(self.num_variants, ())) if self.num_variants > 1 else 0
        item.update({key: value[i, variant] if key in self.variant_keys else value[i]
                     for key, value in self.tensors.items()})
        return item


def stored_keys(frozen: dict[int, torch.nn.Module]) -> tuple[set[str], set[str]]:
    """The keys the cache stores per item, and those of them stored per image variant."""
    variant_keys = {LATENT_MEAN, LATENT_STD} | {condition_key(i, out) for i, embedder in frozen.items()
                                                if _reads_image(embedder) for out in embedder.outputs}
    return variant_keys | {condition_key(i, out) for i in frozen for out in frozen[i].outputs}, variant_keys


def _checker(length: int, keys: set[str], variant_keys: set[str], num_variants: int):
    def check(contents) -> None:
        tensors, metadata = contents
        if metadata.get("format") != str(CACHE_FORMAT):
            raise InvalidCache(f"format {metadata.get('format')}, expected {CACHE_FORMAT}")
        if set(tensors) != keys or set(json.loads(metadata.get("variant_keys", "[]"))) != variant_keys:
            raise InvalidCache(f"it holds {sorted(tensors)}, expected {sorted(keys)}")
        for key, value in tensors.items():
            expected = (length, num_variants) if key in variant_keys else (length,)
            if tuple(value.shape[:len(expected)]) != expected:
                raise InvalidCache(f"{key} has shape {tuple(value.shape)}, expected {expected} first")
    return check


def cached_dataset(dataset: Dataset, split: str, data_config: dict, autoencoder, conditioner: Conditioner,
                   cache_dir: str | Path, batch_size: int = 256, num_workers: int = 0, device="cpu") -> CachedDataset:
    """This split's cache: read if a valid file with its fingerprint exists, else built once and written."""
    if not callable(getattr(dataset, "metadata", None)):
        raise TypeError(f"data.cache=true needs {type(dataset).__name__}.metadata(i), the item's fields without "
                        "its image, so that training from the cache never loads an image; add it or set "
                        "data.cache=false")
    frozen = frozen_embedders(conditioner)
    plain, variants = cacheable_variants(dataset)
    key = cache_fingerprint(data_config, split, dataset, autoencoder, frozen)
    path = Path(cache_dir) / f"{split}-{key}.safetensors"
    keys, variant_keys = stored_keys(frozen)

    def build():
        check_deterministic(plain)
        tensors = compute_cache(plain, variants, autoencoder, frozen, batch_size, num_workers, device)
        return tensors, {"format": str(CACHE_FORMAT), "variant_keys": json.dumps(sorted(variant_keys))}

    tensors, _ = cache_file.load_or_build(path, build, _checker(len(dataset), keys, variant_keys, len(variants)))
    return CachedDataset(dataset, tensors, sorted(variant_keys))
