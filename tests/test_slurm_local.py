"""A sweep through submitit's local executor (what `launcher=slurm` does on a cluster): both jobs complete,
and a job sent the requeue signal mid-run (USR2, as submitit has SLURM send it before a time limit or
on preemption) writes last.ckpt at that step, is requeued, resumes from it with the same wandb run, and
ends with the weights of the job beside it that was never interrupted."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
from conftest import ROOT, TINY
from wandb_log import history_with, records

from ldm.utils.checkpoint import load_checkpoint

# several processes and ports each: these run one after another, in one worker of a parallel suite
pytestmark = pytest.mark.xdist_group("distributed")

STEPS = 12
# two jobs that differ only in how often they log (the same weights either way)
SWEEP = TINY + ["launcher=submitit_local", "logger=wandb", "callbacks.sample_grid=null", "model.hidden_size=64",
                "data.batch_size=16", f"trainer.max_steps={STEPS}", "trainer.val_check_interval=4",
                "+trainer.limit_val_batches=1", "trainer.log_every_n_steps=1,2"]


class Pace(L.Callback):
    """Writes this process's id beside the run when training starts, and slows every step down a little,
    so that a test can signal the job in the middle of its training."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def on_train_start(self, trainer, pl_module):
        (Path(trainer.default_root_dir) / "pid").write_text(str(os.getpid()))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        time.sleep(self.seconds)


def wandb_runs(job_dir: Path) -> list[Path]:
    return sorted(job_dir.glob("wandb/offline-run-*/run-*.wandb"))


@pytest.mark.slow  # a signal timed against a running sweep: run alone (make test-slow)
def test_requeued_job_resumes_from_the_signalled_step_with_the_same_wandb_run(tmp_path):
    sweep = tmp_path / "sweep"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]), WANDB_MODE="offline",
               OMP_NUM_THREADS="1")
    sweep_process = subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), "-m", f"hydra.sweep.dir={sweep}", *SWEEP,
         "+callbacks.pace._target_=test_slurm_local.Pace", "+callbacks.pace.seconds=0.3"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    job = sweep / "0"
    try:
        deadline = time.time() + 300
        while not (job / "checkpoints" / "last.ckpt").is_file():  # the first validation, at step 4
            assert sweep_process.poll() is None and time.time() < deadline, "the sweep ended before the signal"
            time.sleep(0.1)
        os.kill(int((job / "pid").read_text()), signal.SIGUSR2)
        output, _ = sweep_process.communicate(timeout=600)
    finally:
        if sweep_process.poll() is None:
            sweep_process.kill()
    assert sweep_process.returncode == 0, output[-4000:]

    log = (job / "train.log").read_text()
    assert "received SIGUSR2" in log
    resumed = re.findall(r"resuming from (\S+) \(step (\d+)\)", log)
    assert len(resumed) == 1 and resumed[0][0] == str(job / "checkpoints" / "last.ckpt"), log[-3000:]
    step = int(resumed[0][1])
    stopped = re.findall(r"stopping for the requeue after step (\d+)", log)
    print(f"job 0 stopped after step {stopped} on the signal, was requeued and resumed from last.ckpt at step {step}")
    assert stopped == [str(step)] and 4 <= step < STEPS

    # both jobs finished; the requeued one ends with the weights of the one that ran through
    a = load_checkpoint(job / "checkpoints" / "last.ckpt")
    b = load_checkpoint(sweep / "1" / "checkpoints" / "last.ckpt")
    assert a["global_step"] == b["global_step"] == STEPS
    worst = max((a["state_dict"][k].float() - b["state_dict"][k].float()).abs().max().item() for k in a["state_dict"])
    print(f"largest weight difference to the uninterrupted job: {worst:.3g}")
    assert worst < 1e-5
    assert not (sweep / "1" / "train.log").read_text().count("resuming from")

    # one wandb run, continued after the requeue: the same id in both parts, the second part after the step
    parts = wandb_runs(job)
    run_id = (job / "wandb_id.txt").read_text().strip()
    print(f"wandb run id {run_id} in {len(parts)} parts: {[p.parent.name for p in parts]}")
    assert len(parts) == 2 and {p.name for p in parts} == {f"run-{run_id}.wandb"}
    steps = [r["trainer/global_step"] for r in history_with(parts[1], "train/loss") if "train/loss" in r]
    assert steps and min(steps) >= step, steps
    runs = [next(r.run for r in records(p) if r.WhichOneof("record_type") == "run") for p in parts]
    assert {r.run_group for r in runs} == {str(sweep)}
    assert len(wandb_runs(sweep / "1")) == 1


def test_under_submitit_on_slurm_only_submitit_requeues(monkeypatch):
    """Lightning's own SLURM requeue (USR1: hpc_ckpt and scontrol requeue) is off where submitit requeues."""
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    from ldm.run.requeue import cluster_plugins

    for name, value in {"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "train", "SUBMITIT_EXECUTOR": "slurm"}.items():
        monkeypatch.setenv(name, value)
    (environment,) = cluster_plugins()
    assert isinstance(environment, SLURMEnvironment) and not environment.auto_requeue
    monkeypatch.delenv("SUBMITIT_EXECUTOR")
    assert cluster_plugins() == []  # plain SLURM: Lightning's environment and requeue as Lightning sets them up
