"""A comparison (members that do the same work, alternated step by step) and its result rows."""

from __future__ import annotations

import gc
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ldm.tools.bench.flops import count_flops
from ldm.tools.bench.timing import alternate, median


@dataclass
class Member:
    """One side of a comparison: `step()` does one step (a train step, an encode-decode, a sampling run)."""

    label: str
    step: Callable[[], object]
    params: int | None = None
    prepare: Callable[[], object] | None = None  # after the FLOP count, before timing (e.g. switch on compile)


@dataclass
class Comparison:
    """Members measured together; each row puts one member against another (None: no reference)."""

    group: str
    name: str
    batch_size: int
    members: list[Member]
    rows: list[tuple[int, int | None]] = field(default_factory=lambda: [(0, 1)])
    images: int | None = None  # images each step handles; the batch size unless said otherwise
    note: str = ""  # how the members were made to do the same work


def parameter_count(*modules: torch.nn.Module) -> int:
    return sum(p.numel() for module in modules for p in module.parameters())


def side(member: Member, seconds: float, flops: int, images: int, peak: float) -> dict:
    """One side of a result row: a member's time, throughput, FLOP rate and MFU."""
    achieved = flops / seconds
    return {"label": member.label, "seconds": seconds, "images_per_s": images / seconds, "flops": flops,
            "gflops_per_s": achieved / 1e9, "mfu": achieved / peak, "params": member.params}


def measure(comparison: Comparison, precisions: list[str], steps: int, warmup: int, device: torch.device,
            peaks: dict[str, float]) -> list[dict]:
    """Count each member's FLOPs once, then alternate the members at each precision; one dict per row."""
    # counting runs a whole step, so it is one more warm-up too; FLOPs do not depend on the precision
    flops = [count_flops(member.step) for member in comparison.members]
    for member in comparison.members:  # compiled kernels bypass the FLOP counter: count eager, then compile
        if member.prepare is not None:
            member.prepare()
    images = comparison.images or comparison.batch_size
    results = []
    for precision in precisions:
        times = alternate({str(i): m.step for i, m in enumerate(comparison.members)}, steps, warmup, device,
                          precision)
        seconds = [median(times[str(i)]) for i in range(len(comparison.members))]
        for index, reference in comparison.rows:
            sides = {which: side(comparison.members[i], seconds[i], flops[i], images, peaks[precision])
                     for which, i in (("project", index), ("reference", reference)) if i is not None}
            results.append({
                "group": comparison.group, "name": comparison.name, "precision": precision,
                "batch_size": comparison.batch_size, "steps": steps, "note": comparison.note,
                "project": sides["project"], "reference": sides.get("reference"),
                "ratio": seconds[index] / seconds[reference] if reference is not None else None,
            })
    return results


def release() -> None:
    """Free the last comparison's models before the next one is built (two DiT-B with AdamW are large)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
