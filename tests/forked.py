"""Run train.py / sample.py / evaluate.py / export.py as a user would, without paying for the imports each time.

Starting a command costs seconds of CPU before it reads its arguments (torch, Lightning, torchmetrics). A
server process imports those once; each command then runs in a fresh fork of it, with its own argv, working
directory, environment and stdout/stderr, and returns its exit status as a subprocess would (negative for a
signal). Nothing runs in the server itself, so every fork starts from the same clean state. `LDM_TEST_NO_FORK=1`
runs every command as a real subprocess instead.
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SERVER = r"""
import json, os, runpy, sys, traceback
import ldm.commands.train, ldm.commands.sample, ldm.commands.evaluate, ldm.commands.export  # noqa: F401
import hydra  # noqa: F401
import torch
FRESH_THREADS = torch.get_num_threads()  # a new process's count: the server starts without OMP_NUM_THREADS
for line in sys.stdin:
    request = json.loads(line)
    sys.stdout.flush(); sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.setpgid(0, 0)
            os.chdir(request["cwd"])
            os.environ.clear(); os.environ.update(request["env"])
            torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or FRESH_THREADS))
            for fd, path, flags in ((0, os.devnull, os.O_RDONLY), (1, request["stdout"], os.O_WRONLY),
                                    (2, request["stderr"], os.O_WRONLY)):
                os.dup2(os.open(path, flags), fd)
            script = request["argv"][0]
            sys.argv = list(request["argv"])
            sys.path[0] = os.path.dirname(script)
            for entry in reversed(request["env"].get("PYTHONPATH", "").split(os.pathsep)):
                if entry and entry not in sys.path:
                    sys.path.insert(1, entry)
            try:
                runpy.run_path(script, run_name="__main__")
                code = 0
            except SystemExit as stop:
                code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
                if isinstance(stop.code, str):
                    print(stop.code, file=sys.stderr)
            except BaseException:
                traceback.print_exc()
        finally:
            sys.stdout.flush(); sys.stderr.flush()
            os._exit(code)
    print(json.dumps({"pid": pid}), flush=True)
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}), flush=True)
"""


class _Server:
    process: subprocess.Popen | None = None

    @classmethod
    def get(cls) -> subprocess.Popen:
        if cls.process is None or cls.process.poll() is not None:
            env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
            env.update(PYTHONPATH=str(ROOT))
            cls.process = subprocess.Popen([sys.executable, "-c", SERVER], cwd=ROOT, env=env, text=True,
                                           stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            atexit.register(cls.stop)
        return cls.process

    @classmethod
    def stop(cls) -> None:
        if cls.process is not None and cls.process.poll() is None:
            cls.process.stdin.close()
            cls.process.wait(timeout=30)


def run(script: str, *arguments: str, cwd: Path = ROOT, env: dict | None = None,
        timeout: float | None = None) -> subprocess.CompletedProcess:
    """`python ROOT/script arguments...` in `cwd` with `env` (default: this process's); output captured as text."""
    argv = [str(ROOT / script), *arguments]
    env = dict(os.environ if env is None else env)
    if os.environ.get("LDM_TEST_NO_FORK"):
        return subprocess.run([sys.executable, *argv], cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=timeout)
    server = _Server.get()
    with tempfile.TemporaryDirectory() as folder:
        out, err = Path(folder) / "stdout", Path(folder) / "stderr"
        out.touch()
        err.touch()
        request = {"argv": argv, "cwd": str(cwd), "env": env, "stdout": str(out), "stderr": str(err)}
        server.stdin.write(json.dumps(request) + "\n")
        server.stdin.flush()
        pid = json.loads(server.stdout.readline())["pid"]
        if timeout is not None:
            signal.signal(signal.SIGALRM, lambda *_: os.killpg(pid, signal.SIGKILL))
            signal.alarm(int(timeout) + 1)
        try:
            returncode = json.loads(server.stdout.readline())["returncode"]
        finally:
            if timeout is not None:
                signal.alarm(0)
        if timeout is not None and returncode == -signal.SIGKILL:
            raise subprocess.TimeoutExpired([sys.executable, *argv], timeout)
        return subprocess.CompletedProcess([sys.executable, *argv], returncode, out.read_text(), err.read_text())
