"""A cache file: built by one process while the others wait, written atomically, checked when read."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch
from filelock import FileLock, Timeout
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ldm.files import TEMP_SUFFIX, atomic_write

log = logging.getLogger(__name__)

Contents = tuple[dict[str, torch.Tensor], dict[str, str]]  # tensors, string metadata


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
    try:  # the common case, no lock: files only ever appear whole under their real name
        contents = read(path)
        check(contents)
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
                contents = read(path)
                check(contents)
                return contents
            except InvalidCache as err:
                log.warning("rebuilding the cache: %s", err)
        # writers of this file hold the lock, so what is left beside it is from a killed build
        for stale in path.parent.glob(f".{path.name}.*{TEMP_SUFFIX}"):
            stale.unlink(missing_ok=True)
        log.info("building cache %s", path)
        started = time.monotonic()
        contents = build()
        write(path, *contents)
        log.info("built cache %s in %.1f s", path, time.monotonic() - started)
        return contents
    finally:
        lock.release()
