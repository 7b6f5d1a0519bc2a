"""Hydra callbacks that check the composed config before Hydra creates or writes the run directory.

Hydra calls `on_run_start` before it makes the job's output directory and saves `.hydra/config.yaml`
there, so a config mistake found here leaves nothing behind, and an existing run directory's config is
never overwritten by a config it does not match. In a sweep each job is checked in `on_job_start`
(after Hydra made its directory, which is then removed again). Hydra turns exceptions raised in a
callback into warnings, so a failing check prints its `error:` lines and exits itself.
"""

from __future__ import annotations

import copy
import os
import tempfile
from pathlib import Path
from typing import Any

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict

from ldm.utils.errors import ConfigError, NewRunDir, UserError, exit_for, remove_new_run_dir

# The check functions are imported when a check runs, not here: Hydra builds these callbacks before it
# parses `--help`, and the checks import torch.

_created_run_dir: NewRunDir | None = None  # the directory the current job's check found absent (Hydra made it)


def created_run_dir() -> NewRunDir | None:
    """The run directory this job created (removed again when the job fails on a user error), else None."""
    return _created_run_dir


def new_run_dir(run_dir: Path) -> NewRunDir | None:
    """`run_dir` and the highest of its folders that do not exist yet; None when it exists."""
    if run_dir.exists():
        return None
    top = run_dir
    while not top.parent.exists() and top.parent != top:
        top = top.parent
    return NewRunDir(run_dir, top)


def location_problems(key: str, directory: Path) -> list[str]:
    """Whether the run directory can be made (or, when it exists, written to): no file in its place or above it,
    and a folder that takes new files. Tried by making (and removing) an empty folder, which also answers for
    read-only file systems and for root, whom permission bits do not stop."""
    existing = directory
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        where = "is a file" if existing == directory else f"cannot be made: {existing} is a file, not a folder"
        return [f"{key}={directory} {where}; give a folder path ({key}=DIR)"]
    try:
        probe = tempfile.mkdtemp(prefix=".ldm-write-check-", dir=existing)
    except OSError as error:
        return [f"{key}={directory} cannot be {'written to' if existing == directory else 'made'}: {existing} is "
                f"not writable ({error.strerror}); give a folder you can write to ({key}=DIR, or LDM_ROOT=DIR for "
                "runs/ and .cache/)"]
    os.rmdir(probe)
    return []


def checked_by_hydra(callback: type[Callback]) -> bool:
    """Whether this job runs under Hydra with `callback` configured: then its config was checked before the job
    started (a failing check exits), and the command need not check it again."""
    if not HydraConfig.initialized():
        return False
    target = f"{callback.__module__}.{callback.__qualname__}"
    nodes = (OmegaConf.select(HydraConfig.get(), "callbacks") or {}).values()
    return any(node is not None and node.get("_target_") == target for node in nodes)


class CheckConfig(Callback):
    """Runs `problems(config)` before the run; in single-run mode also refuses a mismatching run directory."""

    compare_run_dir = False
    writes_run_dir = True  # sample.py writes where `out=` says, not in its run directory (".")

    def __init__(self) -> None:
        self.single_run = self.sweep_checked = False

    def problems(self, config: DictConfig) -> list[str]:
        raise NotImplementedError

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        global _created_run_dir
        self.single_run = True
        run_dir = Path(str(OmegaConf.select(config, "hydra.run.dir")))
        _created_run_dir = new_run_dir(run_dir)
        if self.writes_run_dir and (problems := location_problems("hydra.run.dir", run_dir)):
            exit_for(ConfigError(problems))
        existed = _created_run_dir is None
        self._check(config, run_dir if existed and self.compare_run_dir else None)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Every job of a basic sweep is checked before the sweep directory is made; other sweepers choose
        their jobs as they go, so those are checked one by one in `on_job_start`."""
        try:
            jobs = sweep_jobs(config)
        except Exception:  # a sweep Hydra cannot expand: the sweeper reports it in its own words
            jobs = None
        sweep_dir = Path(str(OmegaConf.select(config, "hydra.sweep.dir")))
        if self.writes_run_dir and (problems := location_problems("hydra.sweep.dir", sweep_dir)):
            exit_for(ConfigError(problems))
        if jobs is None:
            return
        problems = []
        for number, (overrides, job) in enumerate(jobs):
            problems += [f"job {number} ({' '.join(overrides)}): {line}" for line in self.problems(job_config(job))]
        if problems:
            exit_for(ConfigError(problems))
        self.sweep_checked = True

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        global _created_run_dir
        if self.single_run:  # checked in on_run_start, before the directory existed
            return
        if self.sweep_checked:
            _created_run_dir = None
            return
        job_dir = Path(str(config.hydra.runtime.output_dir))
        _created_run_dir = None if any(job_dir.rglob("*.ckpt")) else NewRunDir(job_dir, job_dir)
        try:
            self._check(config, None)
        except SystemExit:
            remove_new_run_dir(_created_run_dir)
            raise

    def _check(self, config: DictConfig, existing_run_dir: Path | None) -> None:
        task_config = job_config(config)
        try:
            problems = self.problems(task_config)
            if existing_run_dir is not None:
                from ldm.checks.run_dir import run_dir_problems  # deferred: imports torch (see above)

                problems = run_dir_problems(task_config, existing_run_dir) + problems
            if problems:
                raise ConfigError(problems)
        except UserError as error:
            exit_for(error)


class CheckTrainingConfig(CheckConfig):
    compare_run_dir = True

    def problems(self, config: DictConfig) -> list[str]:
        from ldm.checks.training import check_training  # deferred: imports torch (see above)

        try:
            check_training(config)
        except ConfigError as error:
            return error.errors
        return []


class CheckSamplingConfig(CheckConfig):
    writes_run_dir = False

    def problems(self, config: DictConfig) -> list[str]:
        from ldm.checks.sampling import sampling_problems  # deferred: imports torch (see above)

        return sampling_problems(config)


class CheckEmaConfig(CheckConfig):
    """Hydra callback of `python -m ldm.ema`: the run and the length asked of its snapshots."""

    def problems(self, config: DictConfig) -> list[str]:
        from ldm.checks.sampling import ema_problems  # deferred: imports torch (see above)

        return ema_problems(config)


class CheckEvaluationConfig(CheckConfig):
    """Hydra callback of evaluate.py: the arguments are checked before the output directory is made."""

    sweeping = False

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        self.sweeping = True
        super().on_multirun_start(config, **kwargs)

    def problems(self, config: DictConfig) -> list[str]:
        from ldm.checks.evaluation import device_count, evaluation_problems  # deferred: imports torch (see above)

        problems = evaluation_problems(config)
        if self.sweeping and (count := device_count(config)) > 1:
            problems.append(f"devices={config.get('devices')} ({count} devices) in a sweep (-m): Lightning would start "
                            "every further rank as the whole sweep; sweep with devices=1, or evaluate on several "
                            "devices one job at a time (python evaluate.py run=DIR devices=N)")
        return problems


def job_config(config: DictConfig) -> DictConfig:
    """The task's config as the job function gets it (Hydra's own node removed)."""
    task = copy.deepcopy(config)
    with open_dict(task):
        task.pop("hydra", None)
    return task


def sweep_jobs(config: DictConfig) -> list[tuple[list[str], DictConfig]] | None:
    """(overrides, composed config) of every job of a basic sweep, as the sweeper will launch them."""

    if OmegaConf.select(config, "hydra.sweeper._target_") != f"{BasicSweeper.__module__}.{BasicSweeper.__name__}":
        return None
    loader = GlobalHydra.instance().config_loader()
    params = OmegaConf.select(config, "hydra.sweeper.params") or {}
    arguments = [f"{key}={value}" for key, value in params.items()] + list(config.hydra.overrides.task)
    overrides = OverridesParser.create(config_loader=loader).parse_overrides(arguments)
    jobs = [job for batch in BasicSweeper.split_arguments(overrides, None) for job in batch]
    return [(job, loader.load_sweep_config(config, job)) for job in jobs]
