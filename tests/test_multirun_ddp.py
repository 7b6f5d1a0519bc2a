"""A Hydra sweep of DDP jobs: every job runs once, all of its ranks with its own config, in its own directory."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from conftest import CONF, ROOT, TINY
from forked import run
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import open_dict
from wandb_log import records

from ldm.run.loggers import WANDB_ID_FILE, wandb_logger
from ldm.utils.checkpoint import load_checkpoint

# several processes and ports each: these run one after another, in one worker of a parallel suite
pytestmark = pytest.mark.xdist_group("distributed")

SWEEP = TINY + ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "data.batch_size=16",
                "model.hidden_size=64", "logger=wandb", "callbacks.sample_grid=null", "trainer.max_steps=2",
                "trainer.val_check_interval=2", "+trainer.limit_val_batches=1"]
SCHEDULES = {"flow": "RectifiedFlow", "ddpm": "DDPM"}


def train_command(*args: str, cwd) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]), WANDB_MODE="offline",
               OMP_NUM_THREADS="1")
    return run("train.py", *args, cwd=cwd, env=env, timeout=300)


def wandb_run(job_dir):
    """(id, group, name) of the one wandb run in a job directory."""
    logs = list(job_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(logs) == 1, logs
    run = next(r.run for r in records(logs[0]) if r.WhichOneof("record_type") == "run")
    return run.run_id, run.run_group, run.display_name


def test_sweep_of_ddp_jobs_runs_each_job_once_with_its_config(tmp_path):
    sweep, probes = tmp_path / "sweep", tmp_path / "probes"
    result = train_command("-m", f"hydra.sweep.dir={sweep}", "schedule=flow,ddpm", *SWEEP,
                           "+callbacks.record._target_=test_ddp.RecordRanks", f"+callbacks.record.path={probes}",
                           cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    assert sorted(p.name for p in sweep.iterdir()) == ["0", "1", "multirun.yaml"]
    assert not (tmp_path / "runs").exists() and not (tmp_path / "outputs").exists(), "a rank ran a sweep of its own"

    ranks = [json.loads(p.read_text()) for p in probes.glob("*.json")]
    assert len(ranks) == 4, [(r["run_dir"], r["rank"]) for r in ranks]  # 2 jobs x 2 ranks, each once
    sweep_process = {r["pid"] for r in ranks if r["rank"] == 0}
    assert len(sweep_process) == 1  # both jobs' rank 0 is the sweep itself
    for number, (choice, schedule) in enumerate(SCHEDULES.items()):
        job_dir = sweep / str(number)
        job = sorted((r for r in ranks if r["run_dir"] == str(job_dir)), key=lambda r: r["rank"])
        assert [r["rank"] for r in job] == [0, 1] and all(r["world"] == 2 for r in job)
        assert [r["schedule"] for r in job] == [schedule, schedule], f"job {number} ranks trained other configs"
        assert job[1]["parent"] == job[0]["pid"]  # rank 1 started by this job's rank 0
        # one config, one set of checkpoints, one logger run
        assert sorted(p.name for p in job_dir.glob(".*")) == [".hydra"]
        assert sorted(p.name for p in (job_dir / ".hydra").iterdir()) == ["config.yaml", "hydra.yaml",
                                                                         "overrides.yaml"]
        assert sorted(p.name for p in (job_dir / "checkpoints").iterdir()) == ["best-step=2.ckpt", "last.ckpt"]
        checkpoint = load_checkpoint(job_dir / "checkpoints" / "last.ckpt")
        assert checkpoint["global_step"] == 2
        run_id, group, name = wandb_run(job_dir)
        assert run_id == (job_dir / "wandb_id.txt").read_text().strip()
        assert group == str(sweep) and f"schedule={choice}" in name.split(","), (group, name)
    assert len({r["pid"] for r in ranks if r["rank"] == 1}) == 2  # a fresh rank 1 per job


def test_strategies_that_train_copies_are_refused_before_training(tmp_path):
    result = train_command(f"hydra.run.dir={tmp_path / 'run'}", "trainer.strategy=ddp_spawn", "trainer.devices=2",
                           "trainer.accelerator=cpu", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "error: trainer.strategy=ddp_spawn trains copies" in result.stderr
    assert "use trainer.strategy=ddp (trainer=ddp)" in result.stderr
    assert not (tmp_path / "run").exists()


def test_wandb_labels_of_a_sweep_job(tmp_path, monkeypatch):
    """name = the job's overrides, group = the sweep directory, tags = the experiment; the id file from rank 0 only."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=digits_pixel", "schedule=flow"], return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.mode, cfg.hydra.sweep.dir = RunMode.MULTIRUN, str(tmp_path / "sweep")
    HydraConfig.instance().set_config(cfg)
    try:
        monkeypatch.setattr(rank_zero_only, "rank", 1)
        wandb_logger(save_dir=str(tmp_path / "rank1"))
        assert not (tmp_path / "rank1" / WANDB_ID_FILE).exists()  # another rank's id would replace rank 0's
        monkeypatch.setattr(rank_zero_only, "rank", 0)
        settings = wandb_logger(save_dir=str(tmp_path / "rank0"))._wandb_init
    finally:
        HydraConfig.instance().cfg = None
    assert settings["name"] == "experiment=digits_pixel,schedule=flow"
    assert settings["group"] == str(tmp_path / "sweep")
    assert settings["tags"] == ["digits_pixel"]
    assert settings["id"] == (tmp_path / "rank0" / WANDB_ID_FILE).read_text()
