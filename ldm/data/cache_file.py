"""A cache file (or shard directory): built by one process while the others wait, published whole, checked when read."""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch
from filelock import FileLock, Timeout
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ldm.utils.files import TEMP_SUFFIX, atomic_write

log = logging.getLogger(__name__)

Contents = tuple[dict[str, torch.Tensor], dict[str, str]]  # tensors, string metadata
T = TypeVar("T")


class InvalidCache(ValueError):
    """A cache file that exists but cannot be used (truncated, corrupt, or not what its name promises)."""


def read(path: Path) -> Contents:
    """All tensors and the metadata of a safetensors file; InvalidCache if it cannot be read whole."""
    try:
        with safe_open(str(path), framework="pt") as file:
            return {key: file.get_tensor(key) for key in file.keys()}, dict(file.metadata() or {})
    except (SafetensorError, OSError) as err:
        raise InvalidCache(f"{path} cannot be read: {err}") from err


def write(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write atomically: readers see the old file or the new one, never a partial one."""
    with atomic_write(path) as handle:
        # safetensors writes by name; the handle is the same unique temporary file, and atomic_write's
        # fsync of it covers what was written before the rename
        save_file(tensors, str(handle.name), metadata=metadata)


def load_or_build(path: Path, build: Callable[[], Contents], check: Callable[[Contents], None]) -> Contents:
    """Read `path` if it holds a valid cache, else build and write it; one process builds at a time.

    `check` raises InvalidCache for contents that do not fit; such a file is rebuilt with a warning."""
    def load() -> Contents:
        contents = read(path)
        check(contents)
        return contents

    def build_and_write() -> Contents:
        contents = build()
        write(path, *contents)
        return contents

    return build_once(path, load, build_and_write)


def build_once(path: Path, load: Callable[[], T], build: Callable[[], T]) -> T:
    """`load()` what `path` holds, or, when it raises InvalidCache, `build()` it there; one process builds at a time.

    `build` publishes `path` whole (a rename), so a reader without the lock never sees a partial cache.
    An unusable one is rebuilt with a warning. Building leaves the global CPU random state untouched, so that
    a run goes on the same whether it built the cache or read it."""
    try:  # the common case, no lock: caches only ever appear whole under their real name
        contents = load()
        log.info("reading cache %s", path)
        return contents
    except InvalidCache:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(f"{path}.lock")
    try:
        lock.acquire(blocking=False)
    except Timeout:
        log.info("another process is building %s; waiting for it", path)
        lock.acquire()
    try:
        if path.exists():  # built while we waited, or there from before but unusable
            try:
                return load()
            except InvalidCache as err:
                log.warning("rebuilding the cache: %s", err)
        # writers of this cache hold the lock, so what is left beside it is from a killed build
        for stale in path.parent.glob(f".{path.name}.*{TEMP_SUFFIX}"):
            remove(stale)
        log.info("building cache %s", path)
        started = time.monotonic()
        # a run that builds must leave the global random stream as one that reads: a DataLoader draws its
        # base seed from it, and later global draws (the latent statistics' posterior samples) follow
        with torch.random.fork_rng(devices=[]):
            contents = build()
        log.info("built cache %s in %.1f s", path, time.monotonic() - started)
        return contents
    finally:
        lock.release()


def remove(path: Path) -> None:
    """Delete a cache file or a cache directory (shards), if there."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
