"""The machine's matmul peak: FLOP/s of large square matmuls, best of a few runs."""

from __future__ import annotations

import torch

from ldm.bench.timing import PRECISIONS, timed


def matmul_peak(precision: str, device: torch.device, size: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of `size` x `size` matmuls in `precision` (2 * size**3 FLOPs each); the best of `repeats`.

    The best run, not the median: the peak is what the hardware can do, and any slower run was
    disturbed by something else.
    """
    if size < 1 or repeats < 1:
        raise ValueError(f"need size >= 1 and repeats >= 1, got size={size}, repeats={repeats}")
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=generator).to(device=device, dtype=PRECISIONS[precision])
    b = torch.randn(size, size, generator=generator).to(device=device, dtype=PRECISIONS[precision])
    out = torch.empty_like(a)
    torch.mm(a, b, out=out)  # warm-up: threads, kernels, the allocator
    best = min(timed(lambda: torch.mm(a, b, out=out), device) for _ in range(repeats))
    return 2 * size**3 / best


def measure_peaks(precisions: list[str], device: torch.device, size: int, repeats: int) -> dict[str, float]:
    """{precision: FLOP/s} for each precision the bench runs."""
    return {precision: matmul_peak(precision, device, size, repeats) for precision in precisions}
