"""The scheduler's "stop now, you will be requeued" signal, answered at the next step boundary.

Under submitit (`launcher=slurm`, `hydra/launcher=submitit_local`) a job is sent USR2 (or
$SUBMITIT_PREEMPT_SIGNAL) some time before its time limit or when it is preempted; submitit's handler
then resubmits the same Hydra job and exits, and the resubmitted job continues from `last.ckpt`
(`resume=auto`). Called mid-step, that handler would leave only the last validation's checkpoint. Here
the signal only marks the request; after the current optimizer step every rank learns of it, `last.ckpt`
is written, and then submitit's handler runs, so the requeued job continues from that very step.
"""

from __future__ import annotations

import logging
import os
import signal

from lightning.pytorch.plugins.environments import SLURMEnvironment

log = logging.getLogger(__name__)


def requeue_signal() -> signal.Signals | None:
    """The signal submitit sends before a timeout or on preemption; None when the job is not run by submitit."""
    if not os.environ.get("SUBMITIT_EXECUTOR"):
        return None
    return getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"))


class RequeueRequest:
    """Holds the signal until `due(trainer)` says, on every rank alike, that the job must stop after this step."""

    def __init__(self, signum: signal.Signals):
        self.signum = signum
        self.received = False
        self.scheduler_handler = signal.getsignal(signum)
        signal.signal(signum, self._mark)

    def _mark(self, signum, frame) -> None:
        log.info("received %s: the job stops after this step, writes last.ckpt and is requeued",
                 signal.Signals(signum).name)
        self.received = True

    def due(self, trainer) -> bool:
        """Whether any rank got the signal (a collective: every rank calls it at the same step)."""
        if trainer.world_size == 1:
            return self.received
        return bool(trainer.strategy.reduce_boolean_decision(self.received, all=False))

    def hand_over(self) -> None:
        """Restore the scheduler's handler and run it: on the job's first task it resubmits the job and exits."""
        signal.signal(self.signum, self.scheduler_handler)
        if callable(self.scheduler_handler):
            self.scheduler_handler(self.signum, None)
        # the other ranks stop here; with status 0, which rank 0 (busy resubmitting the job) takes for no failure
        log.info("stopped on %s: the requeued job continues from last.ckpt", self.signum.name)
        raise SystemExit(0)


def cluster_plugins() -> list:
    """Under submitit on SLURM, Lightning's SLURM environment without its own requeue: submitit requeues the job
    (above), and Lightning's would requeue it a second time if its signal (USR1) were sent too."""
    if requeue_signal() is not None and SLURMEnvironment.detect():
        return [SLURMEnvironment(auto_requeue=False)]
    return []
