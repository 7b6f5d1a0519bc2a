"""Starting a job's other ranks with the job's own config: DDP and FSDP on one machine, in single runs and sweeps.

Lightning starts ranks 1..N-1 by running the command line again. Under `train.py -m` that command is
the whole sweep, so every rank would run every job, and a second job would find the first one's
rank variables in its environment. Here the other ranks run `python -m ldm.commands.train` and read the
job's composed config (resolved: run directory, checkpoint to resume) from stdin; rank 0 waits for
them when the job ends and leaves the process as it found it, so the next job of a sweep starts clean.
Where a scheduler starts every rank itself (SLURM's tasks), nothing is started here.
"""

from __future__ import annotations

import _thread
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager

import torch
import torch.distributed as dist
from lightning.fabric.utilities.distributed import _set_num_threads_if_needed
from lightning.fabric.utilities.rank_zero import _get_rank
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from ldm.utils.files import restored_environment

log = logging.getLogger(__name__)

RANK_MODULE = "ldm.commands.train"  # what the other ranks run (a command, so named rather than imported)

# what the ranks of one job set in the environment (Lightning too): for the job's duration only
JOB_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE", "OMP_NUM_THREADS")


class JobRanksLauncher(_SubprocessScriptLauncher):
    """Starts this machine's other ranks as `python -m ldm.commands.train` with `config` (YAML) on their stdin."""

    def __init__(self, cluster_environment, num_processes: int, num_nodes: int, config: str):
        super().__init__(cluster_environment, num_processes, num_nodes)
        self.config = config
        self._watch: threading.Thread | None = None
        self._job_running = False

    def launch(self, function, *args, trainer=None, **kwargs):
        self.cluster_environment.validate_settings(num_devices=self.num_processes, num_nodes=self.num_nodes)
        if not self.cluster_environment.creates_processes_externally:
            self._start_ranks()
        _set_num_threads_if_needed(num_processes=self.num_processes)  # the ranks share the machine's cores
        return function(*args, **kwargs)

    def _start_ranks(self) -> None:
        self._check_can_spawn_children()
        environment = self.cluster_environment
        shared = dict(os.environ, MASTER_ADDR=environment.main_address, MASTER_PORT=str(environment.main_port),
                      NODE_RANK=str(environment.node_rank()), WORLD_SIZE=str(self.num_processes * self.num_nodes),
                      # the modules this process can import (a test's probes, a script's folder) and no others
                      PYTHONPATH=os.pathsep.join(path for path in sys.path if path and os.path.isdir(path)))
        for local_rank in range(1, self.num_processes):
            process = subprocess.Popen([sys.executable, "-m", RANK_MODULE], stdin=subprocess.PIPE, text=True,
                                       env=dict(shared, LOCAL_RANK=str(local_rank)))
            process.stdin.write(self.config)
            process.stdin.close()
            self.procs.append(process)
        self._job_running = True
        self._watch = threading.Thread(target=self._watch_ranks, daemon=True, name="rank-watch")
        self._watch.start()

    def _watch_ranks(self) -> None:
        """A rank that fails stops the job: the others would wait for it in their next collective."""
        while self._job_running:
            failed = [p for p in self.procs if p.poll() not in (None, 0)]
            if failed:
                log.error("rank process %d ended with status %d: stopping the job", failed[0].pid, failed[0].returncode)
                self.stop_ranks()
                _thread.interrupt_main()
                return
            time.sleep(1.0)

    def stop_ranks(self) -> None:
        self._job_running = False
        for process in self.procs:
            if process.poll() is None:
                process.kill()
        for process in self.procs:
            process.wait()

    def wait_for_ranks(self, timeout: float = 300.0) -> None:
        """After this rank's part of the job: the others end theirs (a rank still running then is stopped)."""
        self._job_running = False
        deadline = time.time() + timeout
        for process in self.procs:
            try:
                process.wait(timeout=max(0.0, deadline - time.time()))
            except subprocess.TimeoutExpired:
                log.warning("rank process %d did not end %.0f s after rank 0: stopping it", process.pid, timeout)
        self.stop_ranks()
        failed = [p.returncode for p in self.procs if p.returncode]
        if failed:
            raise RuntimeError(f"{len(failed)} of the other ranks failed (status {failed}); see their messages above")


def rank_config(cfg: DictConfig, run_dir: str, resume: str | None) -> str:
    """The job's config as the other ranks get it: resolved, with its run directory and resume checkpoint fixed."""
    resolved = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    resolved.paths.output_dir = str(run_dir)
    resolved.resume = resume  # rank 0 chose it: every rank must start from the same file
    return OmegaConf.to_yaml(resolved)


@contextmanager
def job_ranks(trainer, config: Callable[[], str]):
    """Within: the job's ranks run with `config()`. After: they have ended, and the process group and the rank
    variables of the environment are gone, so that another job can start in this process."""
    threads = torch.get_num_threads()
    strategy = trainer.strategy
    launcher = getattr(strategy, "_launcher", None)
    ours = None
    if type(launcher) is _SubprocessScriptLauncher:  # Lightning's re-run of the command line
        ours = JobRanksLauncher(launcher.cluster_environment, launcher.num_processes, launcher.num_nodes, config())
        strategy._launcher = ours
    try:
        with restored_environment(JOB_VARIABLES):
            try:
                yield
            except BaseException:
                if ours is not None:
                    ours.stop_ranks()
                raise
            if ours is not None:
                ours.wait_for_ranks()
    finally:
        torch.set_num_threads(threads)
        _end_process_group()


def _end_process_group() -> None:

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    rank_zero_only.rank = _get_rank() or 0  # what the environment says again, as at import
