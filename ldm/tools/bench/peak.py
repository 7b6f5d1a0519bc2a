"""The machine's matmul peak: FLOP/s of the fastest of a few large matmul shapes, best of a few runs."""

from __future__ import annotations

import torch

from ldm.tools.bench.timing import PRECISIONS, timed

# calls before timing: one was not enough on a CPU with AMX, whose first bf16 matmuls of a process ran at
# 60-75% of the rate reached after a few more (the peak read 2.0-2.5 TFLOP/s measured first, 3.2 after fp32's)
WARMUP_CALLS = 10


def peak_shapes(size: int) -> list[tuple[int, int, int]]:
    """(m, k, n) of the matmuls tried: a square one, and a transformer layer's (2 * size tokens of width
    3/16 * size, projected 4x wider). Matrix units can run the narrow reduction faster than the square:
    on a CPU with AMX, bf16 (4096, 384, 1536) ran at 3.4 TFLOP/s against 2.3 for 2048 square."""
    return [(size, size, size), (2 * size, max(1, 3 * size // 16), max(1, 3 * size // 4))]


def shape_flops(m: int, k: int, n: int, precision: str, device: torch.device, repeats: int) -> float:
    """FLOP/s of (m, k) @ (k, n) matmuls in `precision` (2 m k n FLOPs each); the best of `repeats`."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(m, k, generator=generator).to(device=device, dtype=PRECISIONS[precision])
    b = torch.randn(k, n, generator=generator).to(device=device, dtype=PRECISIONS[precision])
    out = torch.empty(m, n, device=device, dtype=a.dtype)
    for _ in range(WARMUP_CALLS):  # threads, kernels, the allocator, and the matrix units' clock
        torch.mm(a, b, out=out)
    return 2 * m * k * n / min(timed(lambda: torch.mm(a, b, out=out), device) for _ in range(repeats))


def matmul_peak(precision: str, device: torch.device, size: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of the fastest of `peak_shapes(size)` in `precision`, each the best of `repeats` runs.

    The best, not the median: the peak is what the hardware can do, and any slower run or shape was
    held back by something else (another process, the cache, the kernel's tiling).
    """
    if size < 1 or repeats < 1:
        raise ValueError(f"need size >= 1 and repeats >= 1, got size={size}, repeats={repeats}")
    return max(shape_flops(m, k, n, precision, device, repeats) for m, k, n in peak_shapes(size))


def measure_peaks(precisions: list[str], device: torch.device, size: int, repeats: int) -> dict[str, float]:
    """{precision: FLOP/s} for each precision the bench runs."""
    return {precision: matmul_peak(precision, device, size, repeats) for precision in precisions}
