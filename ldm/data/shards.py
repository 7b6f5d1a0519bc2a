"""The offline cache as litdata shards on disk, for data sets larger than memory (`data.cache=stream`).

Each item is what the in-memory cache (ldm/data/cache.py) stores for one image, plus its metadata:
`index` (its position in the dataset), the dataset's `metadata(i)` fields (`label`, `caption`, ...),
`latent_mean` and `latent_std` of shape (num_variants, C, H, W) -- one row per cached variant of the
image, e.g. unflipped and flipped -- and the frozen embedders' `cond.{i}.{output}`. Latents are
stored in float32, as the encoder gives them: a pretrained VAE's posterior std is of the order of
float16's rounding step on the mean (SD's is ~1e-3 against means of several units), so float16
would replace the posterior's own noise by rounding error; float32 also keeps a streamed run's
losses equal to an in-memory one's.

Items are written in a fixed random order: a shard then holds a mix of classes, so that a batch
drawn from a few shards is not a few classes. The directory is built by one process while the
others wait (ldm/data/cache_file.py) and published whole by one rename; its name hashes what the
in-memory cache file's name hashes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from litdata.streaming.writer import BinaryWriter
from torch.utils.data import Dataset, Subset

from ldm.data.cache import (
    cache_fingerprint,
    cacheable_variants,
    check_deterministic,
    encode_batches,
    frozen_embedders,
    stored_keys,
)
from ldm.data.cache_file import InvalidCache, build_once, remove
from ldm.utils.files import restored_environment, temporary_name

#: bump when what a shard item holds or how the directory is laid out changes: older ones are rebuilt
SHARD_FORMAT = 1
INFO_NAME = "ldm.json"
INDEX_NAME = "index.json"  # litdata's
INDEX_KEY = "index"
#: litdata's recommended chunk size: large enough for sequential reads, small enough to shuffle between
CHUNK_BYTES = "64MB"
WRITE_ORDER_SEED = 0


@dataclass(frozen=True)
class Shards:
    """A finished shard directory: where it is, how many items it holds, and the keys stored per variant."""

    directory: Path
    length: int
    variant_keys: tuple[str, ...]


@contextmanager
def _single_writer():
    # litdata names chunk files after the writer's rank and, merging, waits for one index per rank;
    # here one process writes the whole set, whatever distributed run it belongs to
    with restored_environment(("WORLD_SIZE", "GLOBAL_RANK", "NNODES")):
        os.environ.update(WORLD_SIZE="1", GLOBAL_RANK="0", NNODES="1")
        yield


def write_shards(directory: Path, items: Iterable[dict], info: dict, chunk_bytes: int | str = CHUNK_BYTES) -> None:
    """Write `items` as litdata chunks plus `info`, then publish the directory in one rename."""
    temporary = temporary_name(directory)
    try:
        with _single_writer():
            writer = BinaryWriter(str(temporary), chunk_bytes=chunk_bytes)
        for position, item in enumerate(items):
            writer.add_item(position, item)
        writer.done()
        writer.merge(num_workers=1)
        (temporary / INFO_NAME).write_text(json.dumps(info, sort_keys=True))
        _fsync_files(temporary)
        if directory.exists():  # an unusable one (the caller holds the lock)
            remove(directory)
        os.rename(temporary, directory)
    except BaseException:
        remove(temporary)
        raise


def _fsync_files(directory: Path) -> None:
    # the rename publishes the directory; what it holds must be on disk before that
    for path in directory.iterdir():
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())


def check_shards(directory: Path, info: dict) -> None:
    """Raise InvalidCache unless `directory` holds whole shards of what `info` describes."""
    try:
        found = json.loads((directory / INFO_NAME).read_text())
        chunks = json.loads((directory / INDEX_NAME).read_text())["chunks"]
    except (OSError, ValueError, KeyError) as err:
        raise InvalidCache(f"{directory} is not a finished shard directory: {err}") from err
    if found != info:
        raise InvalidCache(f"{directory} holds {found}, expected {info}")
    if sum(chunk["chunk_size"] for chunk in chunks) != info["length"]:
        raise InvalidCache(f"{directory} indexes {sum(c['chunk_size'] for c in chunks)} items, "
                           f"expected {info['length']}")
    for chunk in chunks:
        path = directory / chunk["filename"]
        size = path.stat().st_size if path.is_file() else None
        if size != chunk["chunk_bytes"]:
            raise InvalidCache(f"{path} has {size} bytes, expected {chunk['chunk_bytes']} (truncated or missing)")


def shard_items(plain: Dataset, order: list[int], variants: list, autoencoder, frozen: dict,
                batch_size: int, num_workers: int, device) -> Iterator[dict]:
    """The items to store, in `order`: index, metadata and the encoders' outputs (float32, on the CPU)."""
    position = 0
    for outputs in encode_batches(Subset(plain, order), variants, autoencoder, frozen, batch_size, num_workers,
                                  device):
        for row in range(len(next(iter(outputs.values())))):
            index = order[position]
            position += 1
            metadata = plain.metadata(index)
            if INDEX_KEY in metadata:
                raise ValueError(f"{type(plain).__name__}.metadata({index}) has a key '{INDEX_KEY}', which the shards "
                                 "use for the item's position: rename it")
            tensors = {key: value[row].float() if value.is_floating_point() else value[row]
                       for key, value in outputs.items()}
            yield {INDEX_KEY: index, **metadata, **tensors}


def shard_cache(dataset: Dataset, split: str, data_config: dict, autoencoder, conditioner, cache_dir: str | Path,
                batch_size: int = 256, num_workers: int = 0, device="cpu", chunk_bytes: int | str = CHUNK_BYTES
                ) -> Shards:
    """This split's shards: used if a finished directory with its fingerprint exists, else built once."""
    if not callable(getattr(dataset, "metadata", None)):
        raise TypeError(f"data.cache=stream needs {type(dataset).__name__}.metadata(i), the item's fields without "
                        "its image, to store beside its latents; add it or set data.cache=false")
    frozen = frozen_embedders(conditioner)
    plain, variants = cacheable_variants(dataset)
    key = cache_fingerprint(data_config, split, dataset, autoencoder, frozen)
    # absolute: a resumed run's loader state names the directory, whatever the working directory
    directory = Path(cache_dir).expanduser().resolve() / f"{split}-{key}.litdata"
    keys, variant_keys = stored_keys(frozen)
    info = {"format": SHARD_FORMAT, "length": len(dataset), "num_variants": len(variants),
            "keys": sorted(keys), "variant_keys": sorted(variant_keys)}
    shards = Shards(directory, len(dataset), tuple(sorted(variant_keys)))

    def load() -> Shards:
        check_shards(directory, info)
        return shards

    def build() -> Shards:
        check_deterministic(plain)
        order = np.random.default_rng(WRITE_ORDER_SEED).permutation(len(plain)).tolist()
        with torch.no_grad():
            items = shard_items(plain, order, variants, autoencoder, frozen, batch_size, num_workers, device)
            write_shards(directory, items, info, chunk_bytes)
        return shards

    return build_once(directory, load, build)
