"""Files that a kill can never leave half-written: write beside the target, fsync, rename."""

from __future__ import annotations

import os
import secrets
from contextlib import contextmanager
from pathlib import Path

TEMP_SUFFIX = ".partial"


def temporary_name(path: Path) -> Path:
    """A unique hidden name in the target's directory, so the rename stays on one file system."""
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}{TEMP_SUFFIX}")


@contextmanager
def atomic_write(path: str | Path):
    """Yield a binary file object; on success it replaces `path` in one rename, on failure it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    try:
        with open(tmp, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def _fsync_directory(directory: Path) -> None:
    # the rename itself is durable only once the directory entry is on disk
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_partial_files(directory: str | Path) -> list[Path]:
    """Delete the temporaries that killed writes left in `directory`; returns what was removed."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    stale = sorted(directory.glob(f".*{TEMP_SUFFIX}"))
    for path in stale:
        path.unlink(missing_ok=True)
    return stale
