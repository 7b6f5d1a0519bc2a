"""The suite's command runner (tests/forked.py) answers as a real process would: exit status, output, files."""

from __future__ import annotations

import os

import pytest
from forked import run


@pytest.mark.parametrize("arguments,code", [(["model.depth=0"], 2), (["--cfg", "job", "-p", "model.depth"], 0)])
def test_a_forked_command_answers_as_a_new_process(arguments, code, tmp_path, monkeypatch):
    env = dict(os.environ, LDM_ROOT=str(tmp_path), WANDB_MODE="offline")
    forked = run("train.py", f"hydra.run.dir={tmp_path / 'run'}", *arguments, cwd=tmp_path, env=env)
    monkeypatch.setenv("LDM_TEST_NO_FORK", "1")
    real = run("train.py", f"hydra.run.dir={tmp_path / 'run'}", *arguments, cwd=tmp_path, env=env)
    assert forked.returncode == real.returncode == code, forked.stderr[-2000:]
    assert forked.stdout == real.stdout and forked.stderr == real.stderr
    assert not (tmp_path / "run").exists()


def test_a_signal_is_reported_as_a_subprocess_reports_it(tmp_path):
    script = tmp_path / "die.py"
    script.write_text("import os, signal; print('before', flush=True); os.kill(os.getpid(), signal.SIGKILL)\n")
    result = run(str(script), cwd=tmp_path)
    assert result.returncode == -9 and result.stdout == "before\n"
