"""Files that a kill can never leave half-written: write beside the target, fsync, rename."""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterable
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


def remove_partial_files(directory: str | Path, only_dead_writers: bool = True) -> list[Path]:
    """Delete the temporaries that killed writes left in `directory`; returns what was removed.

    By default a temporary whose writer is still running on this machine (its pid is in the name) is
    left alone, so a cleanup never breaks another process's write in progress. A directory with one
    writer that is not writing yet passes `only_dead_writers=False`: a reused pid cannot keep a leftover."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    stale = [path for path in sorted(directory.glob(f".*{TEMP_SUFFIX}"))
             if not (only_dead_writers and _writer_alive(path))]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def _writer_alive(temporary: Path) -> bool:
    parts = temporary.name[: -len(TEMP_SUFFIX)].split(".")
    if len(parts) < 3 or not parts[-2].isdigit():
        return False  # not a name from `temporary_name`: nothing is writing it
    pid = int(parts[-2])
    if pid == os.getpid():
        return False  # this process writes one file at a time, and not while it cleans up
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # a process of another user
    return True


def keep_copy(path: str | Path, copy: str | Path) -> None:
    """Make `copy` hold what `path` holds now, atomically; a hard link where the file system has them."""
    path, copy = Path(path), Path(copy)
    tmp = temporary_name(copy)
    try:
        os.link(path, tmp)
    except OSError:  # no hard links here: copy the bytes instead
        with open(path, "rb") as source, atomic_write(copy) as handle:
            shutil.copyfileobj(source, handle, 1 << 20)
        return
    try:
        os.replace(tmp, copy)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_directory(copy.parent)


@contextmanager
def restored_environment(names: Iterable[str]):
    """Within: change the environment variables `names` freely. After: each has its value from before again."""
    saved = {name: os.environ.get(name) for name in names}
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
