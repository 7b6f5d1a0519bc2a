"""Mistakes a user can fix (a config value, a file, a data folder) and how the commands report them.

A user error is printed as `error: ...` lines on stderr and the command exits with status 2, with no
traceback; `LDM_DEBUG=1` or `HYDRA_FULL_ERROR=1` keeps the traceback for developers.
"""

from __future__ import annotations

import os
import shutil
import sys
import traceback
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

EXIT_USER_ERROR = 2
DEBUG_VARIABLES = ("LDM_DEBUG", "HYDRA_FULL_ERROR")


class UserError(Exception):
    """A mistake in what the user gave; `problems` holds one line per mistake."""

    def __init__(self, problems: Iterable[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


class ConfigError(UserError, ValueError):
    """One or more config mistakes, one line each (each names the key, the value and what would be right)."""

    def __init__(self, errors: Iterable[str]):
        super().__init__(errors)
        self.errors = self.problems

    def __str__(self) -> str:
        return "invalid config:\n  " + "\n  ".join(self.errors)


def user_error_types() -> tuple[type[BaseException], ...]:
    """The exception types that mean "the input is wrong", not "the code is wrong"."""
    types: list[type[BaseException]] = [UserError]
    checkpoint = sys.modules.get("ldm.utils.checkpoint")  # not imported: none of its errors can have been raised
    if checkpoint is not None:
        types.append(checkpoint.CheckpointError)
    # what Lightning raises for settings it refuses when the trainer starts (the config check catches those it
    # knows of before any work; this reports the rest in one line too)
    lightning = sys.modules.get("lightning.fabric.utilities.exceptions")
    if lightning is not None:
        types.append(lightning.MisconfigurationException)
    return tuple(types)


def debugging() -> bool:
    return any(os.environ.get(name, "") not in ("", "0") for name in DEBUG_VARIABLES)


def problem_lines(error: BaseException) -> list[str]:
    problems = getattr(error, "problems", None)
    return list(problems) if problems else str(error).splitlines() or [type(error).__name__]


def print_problems(problems: Iterable[str]) -> None:
    for line in problems:
        print(f"error: {line}", file=sys.stderr)
    sys.stderr.flush()


def exit_for(error: BaseException):
    """Print the error (with its traceback when debugging) and exit with status 2."""
    if debugging():
        traceback.print_exception(error, file=sys.stderr)
    else:
        print_problems(problem_lines(error))
    raise SystemExit(EXIT_USER_ERROR)


@dataclass(frozen=True)
class NewRunDir:
    """A run directory the command is making, and the highest folder it makes for it (`path` or a parent, such
    as runs/ and runs/DATE for the first run)."""

    path: Path
    top: Path


def remove_new_run_dir(run_dir: str | Path | NewRunDir | None) -> None:
    """Delete a run directory that the failing command created itself, unless a checkpoint is already in it, and
    the folders made for it that are left empty (a folder another job has used since stays)."""
    if run_dir is None:
        return
    new = run_dir if isinstance(run_dir, NewRunDir) else NewRunDir(Path(run_dir), Path(run_dir))
    if not new.path.is_dir() or any(new.path.rglob("*.ckpt")):
        return
    shutil.rmtree(new.path, ignore_errors=True)
    folder = new.path.parent
    while new.top != new.path and folder.is_relative_to(new.top):
        try:
            folder.rmdir()  # only an empty one
        except OSError:
            return
        folder = folder.parent


@contextmanager
def reported_user_errors(new_run_dir: str | Path | NewRunDir | None = None):
    """Turn a user error raised inside into `error:` lines and exit 2, removing the run directory it created.

    When debugging the error propagates with its traceback (after the same clean-up)."""
    try:
        yield
    except Exception as error:  # noqa: BLE001 - only user errors are handled, the rest re-raised
        cause = user_error_cause(error)
        if cause is None:
            raise
        remove_new_run_dir(new_run_dir)
        if debugging():
            raise
        exit_for(cause)


def user_error_cause(error: BaseException) -> BaseException | None:
    """`error` itself or the user error it wraps (Hydra wraps what a constructor raises), else None."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, user_error_types()):
            return error
        seen.add(id(error))
        error = error.__cause__
    return None
