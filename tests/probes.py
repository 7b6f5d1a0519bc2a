"""Callbacks that tests add to real runs: stop abruptly at a step, or record the weights at the end."""

import os
import signal as signal_module
from pathlib import Path

import lightning as L
import torch


class Crash(RuntimeError):
    pass


class CrashAt(L.Callback):
    """Raise at the start of step `step`, as a crash or a preemption would."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise Crash(f"crashed at step {self.step}")


class RecordWeights(L.Callback):
    """Keeps a copy of the trainable weights when training ends (the raw weights, before anything else)."""

    last: dict[str, torch.Tensor] = {}

    def on_train_end(self, trainer, pl_module):
        RecordWeights.last = {n: p.detach().clone() for n, p in pl_module.named_parameters() if p.requires_grad}


class FirstStep(L.Callback):
    """Records the step at which this process started training (0 unless it resumed)."""

    seen: int | None = None

    def on_train_start(self, trainer, pl_module):
        FirstStep.seen = trainer.global_step


class RecordSteps(L.Callback):
    """Keeps the trainable weights after every optimizer step, and those each step starts from."""

    after: dict[int, dict[str, torch.Tensor]] = {}
    before: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_start(self, trainer, pl_module):
        RecordSteps.after, RecordSteps.before = {}, {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        RecordSteps.before[trainer.global_step] = _trainable(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        RecordSteps.after[trainer.global_step] = _trainable(pl_module)


def _trainable(module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}


class NaNAt(L.Callback):
    """Plants NaNs in the trainable weights at the start of step `step`, so that step's loss is not finite."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            with torch.no_grad():
                for p in pl_module.parameters():
                    if p.requires_grad:
                        p.fill_(float("nan"))


class SignalAt(L.Callback):
    """Sends this process `signal` after step `step`, once: `marker` is created then, and a rerun leaves it be."""

    def __init__(self, step: int, marker: str, signal: str = "SIGTERM"):
        self.step, self.marker, self.signal = step, marker, signal

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step and not Path(self.marker).exists():
            Path(self.marker).touch()
            os.kill(os.getpid(), getattr(signal_module, self.signal))


class StartState(L.Callback):
    """Records the trainable weights, the optimizer's state and the step when training starts."""

    weights: dict[str, torch.Tensor] = {}
    optimizer_state: dict = {}
    step: int | None = None

    def on_train_start(self, trainer, pl_module):
        StartState.weights = {n: p.detach().clone() for n, p in pl_module.named_parameters() if p.requires_grad}
        StartState.optimizer_state = dict(trainer.optimizers[0].state)
        StartState.step = trainer.global_step


class GradNorms(L.Callback):
    """The norm of all gradients at each optimizer step, before clipping (what the step is made from)."""

    seen: list[float] = []

    def on_train_start(self, trainer, pl_module):
        GradNorms.seen = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        grads = [p.grad.double().flatten() for p in pl_module.parameters() if p.grad is not None]
        GradNorms.seen.append(torch.cat(grads).norm().item())


class Validations(L.Callback):
    """The optimizer steps at which validation ran, and the batches of this epoch trained on by then."""

    seen: list[tuple[int, int]] = []

    def on_train_start(self, trainer, pl_module):
        Validations.seen = []

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            Validations.seen.append((trainer.global_step, trainer.fit_loop.epoch_loop.batch_progress.current.ready))
