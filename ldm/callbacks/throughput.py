"""Training throughput: images/s, and from the denoiser's FLOPs per image (counted once with torch's flop counter)
flops/s and, on devices whose peak Lightning knows, the model FLOPs utilization (MFU).

Lightning's `ThroughputMonitor` is not used as it is: it reads FLOPs from an attribute of the module, logs
validation batches at their own step numbers, and counts the work done at the end of a validation (sample grids,
metrics) as training time. Its rolling-window arithmetic (`lightning.fabric.utilities.throughput.Throughput`) is.
"""

from __future__ import annotations

import logging
import time

import lightning as L
import torch
from lightning.fabric.utilities.throughput import Throughput as Window
from lightning.fabric.utilities.throughput import get_available_flops
from torch.utils.flop_counter import FlopCounterMode

log = logging.getLogger(__name__)


def _first_item(batch: dict) -> dict:
    return {key: value[:1] for key, value in batch.items()}


def denoiser_flops_per_image(module, batch: dict) -> int:
    """FLOPs of one training step of the denoiser on one image: forward and backward (gradients of the trainable
    weights), counted by `torch.utils.flop_counter` on the batch's first item."""
    devices = [module.device.index or 0] if module.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):  # the measurement must not move the run's random streams
        with torch.no_grad():
            item = _first_item(batch)
            z0 = module.latents(item, sample=False)
            cond = module.conditioner(item)
            x_in, t_in = module.schedule.model_input(z0, torch.full((1,), 0.5, device=z0.device))
        weights = [p for p in module.denoiser.parameters() if p.requires_grad]
        with FlopCounterMode(display=False) as counter:
            out = module.denoiser(x_in, t_in, cond)
            # autograd.grad leaves .grad alone: the training step's gradients are not touched
            torch.autograd.grad(out.float().square().mean(), weights, allow_unused=True)
    return int(counter.get_total_flops())


class Throughput(L.Callback):
    """Logs `train/images_per_sec`, `train/flops_per_sec` and `train/mfu` (where known) over the last `window` steps.

    Validations (with their sample grids and metrics) are not training time and are left out."""

    def __init__(self, window: int = 20, count_flops: bool = True):
        if window < 2:
            raise ValueError(f"callbacks.throughput.window must be at least 2 steps, got {window}")
        self.window, self.count_flops = window, count_flops
        self.flops_per_image: int | None = None
        self._meter: Window | None = None
        self._elapsed = self._mark = self._paused = 0.0
        self._batches = self._images = 0

    def on_train_start(self, trainer, pl_module):
        dtype = torch.bfloat16 if "bf16" in str(trainer.precision) else torch.float32
        self._meter = Window(available_flops=get_available_flops(trainer.strategy.root_device, dtype),
                             world_size=trainer.world_size, window_size=self.window)
        self._elapsed, self._batches, self._images = 0.0, 0, 0
        self._mark = time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.count_flops and self.flops_per_image is None:
            self.flops_per_image = denoiser_flops_per_image(pl_module, batch)
            log.info("denoiser: %.3g FLOPs per image per training step", self.flops_per_image)
            self._mark = time.perf_counter()  # the count is not training time

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()
        now = time.perf_counter()
        self._elapsed, self._mark = self._elapsed + now - self._mark, now
        size = _batch_size(batch)
        self._batches, self._images = self._batches + 1, self._images + size
        flops = self.flops_per_image * size if self.flops_per_image is not None else None
        self._meter.update(time=self._elapsed, batches=self._batches, samples=self._images, flops=flops)
        measured = self._meter.compute()
        world = trainer.world_size
        shown = {"train/images_per_sec": measured.get("device/samples_per_sec", 0.0) * world,
                 "train/flops_per_sec": measured.get("device/flops_per_sec", 0.0) * world,
                 "train/mfu": measured.get("device/mfu")}
        for name, value in shown.items():
            if value:  # 0 / None until the window is full, or where the device's peak is unknown
                pl_module.log(name, float(value), on_step=True, on_epoch=False, rank_zero_only=True)

    def on_validation_start(self, trainer, pl_module):
        self._paused = time.perf_counter()

    def on_validation_end(self, trainer, pl_module):
        self._mark += time.perf_counter() - self._paused


def _batch_size(batch) -> int:
    first = next(value for value in batch.values() if torch.is_tensor(value) or isinstance(value, list))
    return len(first)
