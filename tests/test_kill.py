"""SIGKILL a first training run (its offline cache not built yet) at random moments, once in the middle of a
checkpoint write, and restart it with the same command: it ends bit for bit with the weights of an uninterrupted
first run, and every file it leaves reads."""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from conftest import ROOT
from forked import run
from safetensors.torch import load_file

from ldm.utils.checkpoint import POWER_EMA_KEY, load_checkpoint

ARGS = ["trainer.accelerator=cpu", "logger=csv", "data.batch_size=32", "model.depth=2",
        "lr_scheduler.warmup_steps=0", "callbacks.sample_grid=null", "callbacks.ema.update_starting_at_step=0",
        "callbacks.ema.decay=0.9", "callbacks.phema.snapshot_every=10", "trainer.max_steps=100",
        # the metric callbacks stay on (they must not disturb what a resumed run replays), at a size that keeps
        # twenty validations short
        "callbacks.sample_metrics.num_samples=16", "diffusion.sample_steps=2", "callbacks.noise_levels.batch_size=8",
        "trainer.val_check_interval=5", "+trainer.limit_val_batches=1", "trainer.log_every_n_steps=1"]
ENV = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", WANDB_MODE="offline")


def _command(run_dir: Path) -> list[str]:
    # each run its own cache folder, empty at first: the first attempt builds the cache, the restarts read it
    return [sys.executable, str(ROOT / "train.py"), f"hydra.run.dir={run_dir}", f"data.cache_dir={run_dir}.cache",
            *ARGS]


# the same command on a slow disk: every fsync takes a second, so a kill can land inside a write
SLOW_DISK = ("import os, runpy, sys, time; fsync = os.fsync; "
             "os.fsync = lambda fd: (time.sleep(1.0), fsync(fd))[1]; "
             "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")


def _start(run_dir: Path, slow_disk: bool = False) -> subprocess.Popen:
    command = _command(run_dir)
    if slow_disk:
        command = [sys.executable, "-c", SLOW_DISK, *command[1:]]
    return subprocess.Popen(command, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _kill_while_training(run_dir: Path, delay: float, timeout: float = 120) -> bool:
    """Kill `delay` seconds after the run's next checkpoint write; False if it ended before the kill."""
    last = run_dir / "checkpoints" / "last.ckpt"
    before = last.stat().st_mtime_ns if last.is_file() else None
    process = _start(run_dir)
    deadline = time.time() + timeout
    while process.poll() is None and time.time() < deadline:
        if last.is_file() and last.stat().st_mtime_ns != before:
            break
        time.sleep(0.01)
    time.sleep(delay)
    alive = process.poll() is None
    process.send_signal(signal.SIGKILL)
    process.wait()
    return alive


def _kill_during_a_checkpoint_write(run_dir: Path, timeout: float = 120) -> bool:
    """Kill the moment a temporary checkpoint file appears; False if the run ended first."""
    process = _start(run_dir, slow_disk=True)
    folder = run_dir / "checkpoints"
    deadline = time.time() + timeout
    while process.poll() is None and time.time() < deadline:
        if folder.is_dir() and any(p.name.startswith(".last.ckpt.") for p in folder.iterdir()):
            time.sleep(0.2)
            process.send_signal(signal.SIGKILL)
            process.wait()
            return True
    process.kill()
    process.wait()
    return False


def _finish(run_dir: Path) -> str:
    result = run(*_command(run_dir)[1:], env=ENV)  # the uninterrupted run and the last restart: a fork of
    # a process with the imports done (tests/forked.py); the killed attempts are whole processes
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout + result.stderr


def _readable_checkpoints(run_dir: Path, finished: bool = False) -> list[Path]:
    """Every checkpoint and post-hoc EMA snapshot reads; temporaries of a killed write may remain until the run
    restarts."""
    folder = run_dir / "checkpoints"
    files = sorted(path for path in folder.rglob("*") if path.is_file())
    for path in files:
        if path.name.startswith("."):
            assert not finished, f"a temporary file was left behind: {path}"
        elif path.parent.name == "phema":
            load_file(path)  # raises if empty or truncated
        else:
            load_checkpoint(path)
    return files


def test_killed_runs_end_with_the_uninterrupted_weights(tmp_path):
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    _finish(reference)

    assert _kill_during_a_checkpoint_write(killed), "the run finished before a checkpoint write could be hit"
    kills = 1
    rng = random.Random(0)
    for _ in range(3):
        assert _kill_while_training(killed, rng.uniform(0.0, 0.5)), "the run ended before it could be killed"
        kills += 1
        _readable_checkpoints(killed)
    output = _finish(killed)
    assert re.search(r"resuming from .*last.ckpt \(step [1-9]", output), "the last run did not resume"

    _readable_checkpoints(killed, finished=True)
    a = load_checkpoint(reference / "checkpoints" / "last.ckpt")
    b = load_checkpoint(killed / "checkpoints" / "last.ckpt")
    assert a["global_step"] == b["global_step"] == 100
    differ = [f"{key}.{name}" for key in ("state_dict", "ema_state_dict") for name in a[key]
              if not torch.equal(a[key][name], b[key][name])]
    for k, (x, y) in enumerate(zip(a[POWER_EMA_KEY]["averages"], b[POWER_EMA_KEY]["averages"], strict=True)):
        differ += [f"power EMA {k}.{name}" for name in x if not torch.equal(x[name], y[name])]
    snapshots = [sorted((run / "checkpoints" / "phema").iterdir()) for run in (reference, killed)]
    assert [p.name for p in snapshots[0]] == [p.name for p in snapshots[1]] == [
        f"snapshot-{step:07d}.safetensors" for step in range(10, 101, 10)]
    for x, y in zip(*snapshots, strict=True):
        x, y = load_file(x), load_file(y)
        differ += [f"{name} of a snapshot" for name in x if not torch.equal(x[name], y[name])]
    print(f"tensors that differ after {kills} kills: {differ}")
    assert not differ
