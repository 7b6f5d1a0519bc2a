"""Signals that stop a job, answered at the next step boundary: `last.ckpt` is written first.

SIGTERM (what `kill`, `timeout`, a container runtime and SLURM's `scancel` or time limit send) stops the
run after the current optimizer step: `last.ckpt` is written and the process exits with status 143
(128 + SIGTERM), so a scheduler sees a stopped job, not a success; the same command continues from
that very step (`resume=auto`).

Under submitit (`launcher=slurm`, `hydra/launcher=submitit_local`) a job is sent USR2 (or
$SUBMITIT_PREEMPT_SIGNAL) some time before its time limit or when it is preempted; submitit's handler
then resubmits the same Hydra job and exits, and the resubmitted job continues from `last.ckpt`.
Called mid-step, that handler would leave only the last validation's checkpoint. Here a signal only
marks the request; after the current optimizer step every rank learns of it, `last.ckpt` is written,
and then submitit's handler runs, so the requeued job continues from that very step.
"""

from __future__ import annotations

import logging
import os
import signal
import sys

from lightning.pytorch.plugins.environments import SLURMEnvironment

log = logging.getLogger(__name__)

EXIT_TERMINATED = 128 + signal.SIGTERM  # what a shell reports for a process that SIGTERM ended


def requeue_signal() -> signal.Signals | None:
    """The signal submitit sends before a timeout or on preemption; None when the job is not run by submitit."""
    if not os.environ.get("SUBMITIT_EXECUTOR"):
        return None
    return getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"))


def stop_signals() -> list[signal.Signals]:
    """The signals that stop training after the current step: SIGTERM, and submitit's requeue signal."""
    requeue = requeue_signal()
    return [signal.SIGTERM] + ([requeue] if requeue is not None and requeue != signal.SIGTERM else [])


class StopRequest:
    """Holds a stop signal until `due(trainer)` says, on every rank alike, that the job must stop after this step."""

    def __init__(self, signums: list[signal.Signals]):
        self.requeue = requeue_signal()
        self.received: signal.Signals | None = None
        self.previous_handlers = {signum: signal.getsignal(signum) for signum in signums}
        for signum in signums:
            signal.signal(signum, self._mark)

    def _mark(self, signum, frame) -> None:
        signum = signal.Signals(signum)
        then = "is requeued" if signum == self.requeue else "exits"
        log.info("received %s: the job stops after this step, writes last.ckpt and %s", signum.name, then)
        self.received = self.received or signum

    def due(self, trainer) -> bool:
        """Whether any rank got a signal (a collective: every rank calls it at the same step)."""
        if trainer.world_size == 1:
            return self.received is not None
        return bool(trainer.strategy.reduce_boolean_decision(self.received is not None, all=False))

    def restore(self) -> None:
        for signum, handler in self.previous_handlers.items():
            signal.signal(signum, handler)

    def hand_over(self, step: int, path) -> None:
        """Stop the process: the requeue signal goes to the scheduler's handler (on the job's first task it
        resubmits the job and exits); SIGTERM (here or on another rank) exits with status 143."""
        # a signal that another rank got: under submitit the requeue reaches every task alike
        received = self.received or self.requeue or signal.SIGTERM
        self.restore()
        if received == self.requeue:
            log.info("stopping for the requeue after step %d, saved in %s", step, path)
            handler = self.previous_handlers.get(received)
            if callable(handler):
                handler(received, None)
            # the other ranks stop here; with status 0, which rank 0 (busy resubmitting the job) takes for no failure
            log.info("stopped on %s: the requeued job continues from last.ckpt", received.name)
            raise SystemExit(0)
        print(f"stopped by {received.name} after step {step}: saved {path}; run the same command again to "
              "continue from there", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_TERMINATED)


def cluster_plugins() -> list:
    """Under submitit on SLURM, Lightning's SLURM environment without its own requeue: submitit requeues the job
    (above), and Lightning's would requeue it a second time if its signal (USR1) were sent too."""
    if requeue_signal() is not None and SLURMEnvironment.detect():
        return [SLURMEnvironment(auto_requeue=False)]
    return []
