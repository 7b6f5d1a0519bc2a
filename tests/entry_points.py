"""Runs several command lines of the entry points in one process, each as `python SCRIPT ARGS` would run it.

Reads a JSON list of {"script", "arguments", "env", "watch"} from stdin; runs each script's `__main__` block
(runpy, Hydra's state cleared between them, stderr captured) and prints a JSON list of {"status", "stderr",
"created", "removed"}: the exit status, what was printed on stderr, and the paths under each folder of `watch`
that the command created or removed. One process pays for importing torch and Lightning once for all of them.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import runpy
import sys
import traceback
from pathlib import Path


def listing(folders: list[str]) -> set[str]:
    return {str(path) for folder in folders if Path(folder).is_dir() for path in Path(folder).rglob("*")}


def run(script: str, arguments: list[str], env: dict[str, str | None]) -> tuple[int, str]:
    from hydra.core.global_hydra import GlobalHydra

    saved = {key: os.environ.get(key) for key in env}
    for key, value in env.items():
        os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)
    sys.argv = [script, *arguments]
    stderr = io.StringIO()
    status = 0
    try:
        with contextlib.redirect_stderr(stderr):
            runpy.run_path(script, run_name="__main__")
    except SystemExit as stop:
        status = stop.code if isinstance(stop.code, int) else 1
    except BaseException:  # noqa: BLE001 - what a real process would print before dying
        stderr.write(traceback.format_exc())
        status = 1
    finally:
        GlobalHydra.instance().clear()
        for key, value in saved.items():
            os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)
    return status, stderr.getvalue()


def main() -> None:
    results = []
    for row in json.load(sys.stdin):
        before = listing(row["watch"])
        status, stderr = run(row["script"], row["arguments"], row.get("env", {}))
        after = listing(row["watch"])
        results.append({"status": status, "stderr": stderr, "created": sorted(after - before),
                        "removed": sorted(before - after)})
    print(json.dumps(results))


if __name__ == "__main__":
    main()
