"""How a run stops when it must: a NaN or infinite loss ends it with one line naming the step (exit 2, no
traceback, the last good checkpoint kept); SIGTERM writes last.ckpt at the step boundary and exits 143, and the
same command then ends with the weights of an uninterrupted run, bit for bit."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import ROOT, TINY, compose_config
from forked import run

from ldm.callbacks.finite_loss import NonFiniteLoss
from ldm.commands.train import train
from ldm.utils.checkpoint import load_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

ARGS = [*TINY, "logger=csv", "callbacks.sample_grid=null", "callbacks.sample_metrics=null",
        "callbacks.noise_levels=null", "model.hidden_size=64", "data.batch_size=16", "+trainer.limit_val_batches=1"]
# as a user runs it: no HYDRA_FULL_ERROR / LDM_DEBUG, so a user error prints no traceback
ENV = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "LDM_DEBUG")}
ENV.update(PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'tests'}", OMP_NUM_THREADS="1", WANDB_MODE="offline")


def _train(run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    return run("train.py", f"hydra.run.dir={run_dir}", *ARGS, *extra, env=ENV, timeout=600)


def test_a_nan_loss_stops_the_run_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    result = _train(tmp_path / "run", "trainer.max_steps=10", "trainer.val_check_interval=5",
                    "+callbacks.nan._target_=probes.NaNAt", "+callbacks.nan.step=7")
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: the training loss is nan at step 7:"), errors
    assert "last.ckpt (step 5)" in result.stderr and "optimizer.lr" in result.stderr
    checkpoint = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert checkpoint["global_step"] == 5
    for key in ("state_dict", "ema_state_dict"):
        assert all(torch.isfinite(value).all() for value in checkpoint[key].values() if value.is_floating_point())


def test_a_learning_rate_far_too_high_stops_the_run(tmp_path):
    cfg = compose_config(ARGS + ["optimizer.lr=1e30", "trainer.max_steps=10", "trainer.val_check_interval=5"],
                         tmp_path)
    with pytest.raises(NonFiniteLoss, match=r"at step \d+: .*lower optimizer.lr \(now 1e\+30\)"):
        train(cfg)


@pytest.mark.slow  # three runs of train.py, one after another (about 75 s)
def test_sigterm_saves_last_ckpt_exits_non_zero_and_the_rerun_ends_bit_exact(tmp_path):
    # the process signals itself once after step 13 (mid-way between validations at 10 and 20)
    steps = ["trainer.max_steps=20", "trainer.val_check_interval=10", "+callbacks.term._target_=probes.SignalAt",
             "+callbacks.term.step=13"]
    reference, stopped = tmp_path / "reference", tmp_path / "stopped"
    (tmp_path / "no-signal").touch()
    assert _train(reference, *steps, f"+callbacks.term.marker={tmp_path / 'no-signal'}").returncode == 0

    command = [*steps, f"+callbacks.term.marker={tmp_path / 'signalled'}"]
    result = _train(stopped, *command)
    assert result.returncode == 143, result.stderr[-3000:]
    assert "stopped by SIGTERM after step 13" in result.stderr and "Traceback" not in result.stderr
    assert load_checkpoint(stopped / "checkpoints" / "last.ckpt")["global_step"] == 13

    again = _train(stopped, *command)  # the same command
    assert again.returncode == 0, again.stderr[-3000:]
    assert "step 13" in again.stdout + again.stderr  # it resumed from the signal's step
    a = load_checkpoint(reference / "checkpoints" / "last.ckpt")
    b = load_checkpoint(stopped / "checkpoints" / "last.ckpt")
    assert a["global_step"] == b["global_step"] == 20
    differ = [f"{key}.{name}" for key in ("state_dict", "ema_state_dict") for name in a[key]
              if not torch.equal(a[key][name], b[key][name])]
    assert not differ
