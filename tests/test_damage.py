"""Nothing a failure can damage: a kill at any point of a checkpoint save leaves the old or the new
checkpoint whole (with TMPDIR on another file system too), resume finds a readable one, and the
temporaries of killed writes are cleaned up."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import ROOT, TINY, run_script

from ldm.callbacks.last_checkpoint import LastCheckpoint
from ldm.utils.checkpoint import PREVIOUS, CheckpointError, load_checkpoint, newest_readable, save_checkpoint
from ldm.utils.files import TEMP_SUFFIX, remove_partial_files

# rotates last.ckpt to previous.ckpt and saves a new one, as LastCheckpoint does, in a loop;
# every tensor of save number k holds k, so a mixed or partial file shows
SAVER = """
import sys, zipfile
from pathlib import Path
import torch
from ldm.utils.checkpoint import save_checkpoint
from ldm.utils.files import keep_copy
folder = Path(sys.argv[1])
last, previous = folder / "last.ckpt", folder / "previous.ckpt"
for step in range(int(sys.argv[2]), 10**6):
    if last.is_file() and zipfile.is_zipfile(last):
        keep_copy(last, previous)
    save_checkpoint({"state_dict": {f"w{i}": torch.full((1 << 20,), float(step)) for i in range(8)},
                     "global_step": step}, last)
    print(step, flush=True)
"""
REPETITIONS = 10


def _file_systems(tmp_path: Path) -> dict[str, Path | None]:
    """TMPDIR on the test's own file system, and on another one (a tmpfs) where this machine has one."""
    other = Path("/dev/shm")
    if not other.is_dir() or os.stat(other).st_dev == os.stat(tmp_path).st_dev:
        return {"same": tmp_path / "tmp", "other": None}
    return {"same": tmp_path / "tmp", "other": other / f"ldm-test-{os.getpid()}-{tmp_path.name}"}


def _consistent(checkpoint: dict) -> int:
    step = checkpoint["global_step"]
    assert len(checkpoint["state_dict"]) == 8
    for value in checkpoint["state_dict"].values():
        assert torch.all(value == step), "a checkpoint mixing two saves"
    return step


@pytest.mark.parametrize("tmpdir_on", ["same", "other"])
def test_a_kill_during_a_save_leaves_a_whole_checkpoint(tmp_path, tmpdir_on):
    tmpdir = _file_systems(tmp_path)[tmpdir_on]
    if tmpdir is None:
        pytest.skip("no second file system (e.g. a tmpfs at /dev/shm) on this machine")
    tmpdir.mkdir(parents=True)
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    env = dict(os.environ, PYTHONPATH=str(ROOT), TMPDIR=str(tmpdir), OMP_NUM_THREADS="1")
    rng = random.Random(0)
    killed_mid_write, steps = 0, []
    try:
        for _ in range(REPETITIONS):
            before = _consistent(load_checkpoint(folder / "last.ckpt")) if (folder / "last.ckpt").exists() else 0
            process = subprocess.Popen([sys.executable, "-c", SAVER, str(folder), str(before + 1)], env=env,
                                       stdout=subprocess.PIPE, text=True)
            assert process.stdout.readline().strip(), "the saver did not save"  # one save done
            time.sleep(rng.uniform(0.0, 0.4))
            process.send_signal(signal.SIGKILL)
            process.wait()
            process.stdout.close()
            killed_mid_write += any(folder.glob(f".*{TEMP_SUFFIX}"))
            # the old or the new checkpoint, whole, under each name
            step = _consistent(load_checkpoint(folder / "last.ckpt"))
            if (folder / PREVIOUS).exists():
                assert _consistent(load_checkpoint(folder / PREVIOUS)) <= step
            assert step > before  # the saver finished one save before the kill
            found = newest_readable(folder)  # what resume=auto takes
            assert found is not None and found[0].name == "last.ckpt"
            steps.append(step)
            remove_partial_files(folder)
            assert sorted(p.name for p in folder.iterdir()) in (["last.ckpt"], ["last.ckpt", PREVIOUS])
            assert not list(tmpdir.iterdir()), "a temporary file outside the checkpoint's own folder"
    finally:
        if tmpdir_on == "other":
            shutil.rmtree(tmpdir, ignore_errors=True)
    assert killed_mid_write >= 2, f"only {killed_mid_write} of {REPETITIONS} kills landed inside a write"


# ---- the fallback when last.ckpt cannot be read --------------------------------------------------

def _save(path: Path, step: int, mtime: float | None = None) -> Path:
    save_checkpoint({"state_dict": {"w": torch.full((4,), float(step))}, "global_step": step}, path)
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path


@pytest.mark.parametrize("damage", ["empty", "truncated", "not a checkpoint"])
def test_an_unreadable_last_checkpoint_falls_back_to_the_newest_readable_one(tmp_path, caplog, damage):
    now = time.time()
    _save(tmp_path / "best-step=10.ckpt", 10, now - 30)
    _save(tmp_path / PREVIOUS, 20, now - 20)
    last = _save(tmp_path / "last.ckpt", 30, now - 10)
    data = last.read_bytes()
    last.write_bytes({"empty": b"", "truncated": data[: len(data) // 2], "not a checkpoint": b"hello"}[damage])
    with caplog.at_level("WARNING"):
        path, checkpoint = newest_readable(tmp_path)
    assert path.name == PREVIOUS and checkpoint["global_step"] == 20
    assert "last.ckpt" in caplog.text and "previous.ckpt (step 20)" in caplog.text
    (tmp_path / PREVIOUS).write_bytes(b"")
    assert newest_readable(tmp_path)[0].name == "best-step=10.ckpt"


def test_no_readable_checkpoint_is_an_error_naming_each_file(tmp_path):
    (tmp_path / "last.ckpt").write_bytes(b"")
    (tmp_path / PREVIOUS).write_bytes(b"PK\x03\x04 cut short")
    with pytest.raises(CheckpointError) as caught:
        newest_readable(tmp_path)
    assert "last.ckpt is empty" in str(caught.value) and "previous.ckpt" in str(caught.value)
    assert newest_readable(tmp_path / "absent") is None  # nothing there: a fresh start


def _fake_trainer(step: int):
    def save_checkpoint_(path, weights_only=False):
        _save(Path(path), step)
    return SimpleNamespace(fast_dev_run=False, sanity_checking=False, global_step=step, is_global_zero=True,
                           save_checkpoint=save_checkpoint_)


def test_last_checkpoint_keeps_the_one_before_and_never_keeps_a_damaged_one(tmp_path):
    callback = LastCheckpoint(str(tmp_path))
    callback.on_train_end(_fake_trainer(10), None)
    assert not (tmp_path / PREVIOUS).exists()
    callback.on_train_end(_fake_trainer(20), None)
    assert load_checkpoint(tmp_path / PREVIOUS)["global_step"] == 10
    assert load_checkpoint(tmp_path / "last.ckpt")["global_step"] == 20
    (tmp_path / "last.ckpt").write_bytes(b"")  # damaged from outside
    callback.on_train_end(_fake_trainer(30), None)
    assert load_checkpoint(tmp_path / PREVIOUS)["global_step"] == 10  # the good one stays
    assert zipfile.is_zipfile(tmp_path / "last.ckpt")


def test_cleanup_removes_temporaries_of_dead_writers_only(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout.strip()
        alive = tmp_path / f".last.ckpt.{sleeper.pid}.00aa{TEMP_SUFFIX}"
        stale = [tmp_path / f".last.ckpt.{dead}.11bb{TEMP_SUFFIX}", tmp_path / f".odd{TEMP_SUFFIX}"]
        for path in [alive, *stale]:
            path.write_bytes(b"partial")
        assert sorted(remove_partial_files(tmp_path)) == sorted(stale)
        assert alive.exists()
    finally:
        sleeper.kill()
        sleeper.wait()


# ---- end to end: a damaged last.ckpt in a real run directory -------------------------------------

TRAINED = TINY + ["logger=csv", "trainer.max_steps=60", "trainer.val_check_interval=20"]


@pytest.mark.parametrize("damage", ["empty", "truncated"])
def test_resume_auto_continues_from_the_fallback_with_a_warning(trained_run, tmp_path, damage):
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run, run_dir, ignore=shutil.ignore_patterns("samples"))
    last = run_dir / "checkpoints" / "last.ckpt"
    assert load_checkpoint(last)["global_step"] == 60
    fallback_steps = {p.name: load_checkpoint(p)["global_step"] for p in last.parent.glob("*.ckpt") if p != last}
    assert fallback_steps.get(PREVIOUS) == 40
    last.write_bytes(b"" if damage == "empty" else last.read_bytes()[:5000])
    (last.parent / f".last.ckpt.999999999.0000{TEMP_SUFFIX}").write_bytes(b"left by a kill")
    result = run_script("train.py", f"hydra.run.dir={run_dir}", "resume=auto",
                        *[a for a in TRAINED if not a.startswith("trainer.max_steps")], "trainer.max_steps=80")
    output = result.stdout + result.stderr
    reason = "last.ckpt is empty" if damage == "empty" else "last.ckpt (5000 bytes) is truncated"
    assert "skipping an unreadable checkpoint" in output and reason in output
    newest = max(fallback_steps.values())
    assert f"(step {newest})" in output
    assert load_checkpoint(last)["global_step"] == 80
    assert not list(last.parent.glob(f".*{TEMP_SUFFIX}"))
