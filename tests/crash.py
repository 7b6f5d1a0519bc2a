"""A callback that stops a run abruptly at a given step, as a crash or a SLURM preemption would."""

import lightning as L


class Crash(RuntimeError):
    pass


class CrashAt(L.Callback):
    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise Crash(f"crashed at step {self.step}")
