"""Step times of several members measured in turn, so that each sees the same machine load."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from contextlib import nullcontext

import torch

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels, so that a wall-clock time covers the work (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def precision_context(precision: str, device: torch.device):
    """fp32: plain; bf16: autocast on the device (the weights stay fp32, as in mixed-precision training)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=PRECISIONS[precision])


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds of one call of `fn`, queued device work included."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def alternate(members: dict[str, Callable[[], object]], steps: int, warmup: int, device: torch.device,
              precision: str = "fp32") -> dict[str, list[float]]:
    """Call the members in turn, one call each per round; the times of the rounds after `warmup`.

    Alternating step by step means a change of machine load (another process, thermal state) hits
    every member alike, so that their ratio holds even when absolute times drift.
    """
    if steps < 1 or warmup < 0:
        raise ValueError(f"need steps >= 1 and warmup >= 0, got steps={steps}, warmup={warmup}")
    times: dict[str, list[float]] = {label: [] for label in members}
    for round_index in range(warmup + steps):
        for label, fn in members.items():
            # a context per call, as training enters autocast per step: autocast caches its casts of the weights
            # until the outermost context exits, so across steps it would skip the casts (and use stale ones)
            with precision_context(precision, device):
                elapsed = timed(fn, device)
            if round_index >= warmup:  # the first rounds warm up allocators, caches and kernels
                times[label].append(elapsed)
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)
