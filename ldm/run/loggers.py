"""Loggers that continue the same run when a run directory is resumed (config group `logger`)."""

from __future__ import annotations

import csv
import secrets
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_only

from ldm.utils.files import atomic_write

WANDB_ID_FILE = "wandb_id.txt"


def wandb_logger(save_dir: str, project: str = "ldm", name: str | None = None, log_model: bool = False,
                 entity: str | None = None, group: str | None = None, tags: list[str] | None = None) -> WandbLogger:
    """A WandbLogger whose run id is kept in the run directory: a resumed or requeued run logs to the same wandb run.

    Left null, `name`, `group` and `tags` come from the Hydra job (see `job_labels`)."""
    labels = job_labels()
    name, group = name or labels.get("name"), group or labels.get("group")
    tags = list(tags) if tags else labels.get("tags")
    logger = WandbLogger(save_dir=save_dir, id=run_id(Path(save_dir)), resume="allow", project=project, name=name,
                         log_model=log_model, entity=entity, group=group, tags=tags or None)
    # Lightning always passes `anonymous` (None) to wandb.init, and wandb warns that the setting is ignored
    logger._wandb_init.pop("anonymous", None)
    return logger


def run_id(run_dir: Path) -> str:
    """The wandb run id kept in `run_dir`, made by rank 0 on first use (other ranks log nothing to wandb)."""
    id_file = run_dir / WANDB_ID_FILE
    if id_file.is_file():
        return id_file.read_text().strip()
    new_id = secrets.token_hex(4)
    if rank_zero_only.rank == 0:  # ranks started together must not each write an id of their own
        with atomic_write(id_file) as handle:
            handle.write(new_id.encode())
    return new_id


def job_labels() -> dict:
    """wandb labels of the current Hydra job: name = its overrides, group = its sweep directory (sweeps only),
    tags = the experiment preset it uses. Empty outside Hydra."""

    if not HydraConfig.initialized():
        return {}
    job = HydraConfig.get()
    labels: dict = {"name": job.job.override_dirname or None}
    if job.mode == RunMode.MULTIRUN:
        labels["group"] = str(job.sweep.dir)[-128:]  # wandb's limit for a group name
    experiment = job.runtime.choices.get("experiment")
    if experiment:
        labels["tags"] = [str(experiment)]
    return labels


class _ContinuedWriter(ExperimentWriter):
    """Keeps the rows of an existing metrics.csv up to `keep_until_step` instead of deleting the file."""

    def __init__(self, log_dir: str, keep_until_step: int | None):
        self.keep_until_step = keep_until_step  # read by the parent's constructor, through the check below
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:
        path = Path(self.metrics_file_path)
        if not path.is_file():
            return
        with open(path, newline="") as file:
            reader = csv.DictReader(file)
            fields = list(reader.fieldnames or [])
            limit = self.keep_until_step
            rows = [r for r in reader if limit is not None and r.get("step") not in (None, "")
                    and int(r["step"]) <= limit]
        if not rows:
            path.unlink()
            return
        # rows past the checkpoint were logged by steps that the resumed run repeats
        with open(path, "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)
        self.metrics_keys = fields


class ContinuedCSVLogger(CSVLogger):
    """CSVLogger with a fixed version directory that a resumed run continues (set `resume_step` before fit)."""

    def __init__(self, save_dir: str, name: str = "csv", version: int | str = 0, prefix: str = "",
                 flush_logs_every_n_steps: int = 100):
        super().__init__(save_dir, name=name, version=version, prefix=prefix,
                         flush_logs_every_n_steps=flush_logs_every_n_steps)
        self.resume_step: int | None = None

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            Path(self.root_dir).mkdir(parents=True, exist_ok=True)
            self._experiment = _ContinuedWriter(self.log_dir, self.resume_step)
        return self._experiment
