"""Streaming at scale, end to end: python -m ldm.tools.streaming_check [--items 20000] [--dir DIR]

Caches generated images both ways (the in-memory cache's one file, and litdata shards), streams the
shards as 2 ranks x 2 workers (litdata reads a rank from WORLD_SIZE and GLOBAL_RANK), checks that each
item comes once per epoch and that a loader resumed mid-epoch continues exactly, then measures the
peak memory of a fresh process that iterates one epoch of each cache (Linux: read from /proc).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from ldm.autoencoders.identity import IdentityAutoencoder
from ldm.conditioners import Conditioner
from ldm.data.cache import cached_dataset
from ldm.data.shards import shard_cache
from ldm.data.streaming import LatentShards, ResumableLoader

RANKS, WORKERS, BATCH = 2, 2, 50  # 20,000 items: 200 batches per rank, none dropped
CONFIG = {"name": "streaming_check"}


class GeneratedImages(Dataset):
    """Random (3, size, size) images fixed by their index, label index % 1000; flips cached as variants."""

    augmentations = {"flip": True}

    def __init__(self, items: int, size: int = 32):
        self.items, self.size = items, size

    def without_augmentation(self) -> GeneratedImages:
        plain = GeneratedImages(self.items, self.size)
        plain.augmentations = {"flip": False}
        return plain

    def content_fingerprint(self) -> str:
        return f"{self.items}x{self.size}"  # the caches of other sizes are other files

    def __len__(self) -> int:
        return self.items

    def metadata(self, i: int) -> dict:
        return {"label": i % 1000}

    def __getitem__(self, i: int) -> dict:
        image = torch.rand(3, self.size, self.size, generator=torch.Generator().manual_seed(i)) * 2 - 1
        return {"image": image, **self.metadata(i)}


def caches(directory: Path, items: int, size: int, which: str = "both"):
    """The in-memory cache and the shards of the generated images (built on the first call, read after)."""
    dataset, encoder, conditioner = GeneratedImages(items, size), IdentityAutoencoder(3), Conditioner()
    memory = cached_dataset(dataset, "train", CONFIG, encoder, conditioner, directory) if which != "stream" else None
    shards = shard_cache(dataset, "train", CONFIG, encoder, conditioner, directory) if which != "memory" else None
    return memory, shards


def stream_loader(shards, rank: int, world: int = RANKS, workers: int = WORKERS, batches_done=None):
    os.environ.update(WORLD_SIZE=str(world), GLOBAL_RANK=str(rank))
    dataset = LatentShards(shards, shuffle=True, seed=0, drop_last=True)
    return ResumableLoader(dataset, batches_done=batches_done, batch_size=BATCH, num_workers=workers, drop_last=True)


def take(loader, rank: int, batches: int | None = None) -> list[list[int]]:
    """The items of up to `batches` batches (default: an epoch), one list per batch; no more is asked for."""
    os.environ["GLOBAL_RANK"] = str(rank)
    limit, taken = len(loader) if batches is None else batches, []
    for batch in loader:
        taken.append(batch["index"].tolist())
        if len(taken) == limit:
            break
    return taken


def check_once_per_epoch(shards, epochs: int = 2) -> list[bool]:
    loaders = [stream_loader(shards, rank) for rank in range(RANKS)]
    outcome = []
    for _ in range(epochs):
        seen = [i for rank, loader in enumerate(loaders) for batch in take(loader, rank) for i in batch]
        # drop_last leaves out what does not fill a batch on every rank: none when RANKS * BATCH divides the items
        kept = shards.length // (RANKS * BATCH) * RANKS * BATCH
        outcome.append(len(seen) == kept and len(set(seen)) == kept and set(seen) <= set(range(shards.length)))
    return outcome


def check_resume(shards, rank: int, done: int) -> bool:
    """An epoch interrupted after `done` batches (with one more fetched) and resumed equals an uninterrupted one."""
    reference = stream_loader(shards, rank)
    expected = [take(reference, rank) for _ in range(2)]
    interrupted = stream_loader(shards, rank, batches_done=lambda: done)
    take(interrupted, rank)
    take(interrupted, rank, done + 1)
    state = interrupted.state_dict()
    resumed = stream_loader(shards, rank)
    resumed.load_state_dict(state)
    rest = take(resumed, rank, len(expected[1]) - done)
    return expected[1][:done] + rest == expected[1]


def peak_memory(kind: str, directory: Path, items: int, size: int, workers: int) -> dict:
    """Peak memory (MiB) of a fresh process iterating one epoch of the `kind` cache with `workers` workers.

    `rss`: the process's own peak resident set (VmHWM). `pss_with_workers`: the peak, over samples every
    20 ms, of the summed proportional set size of it and its workers, which counts pages they share once.
    (getrusage's max RSS is not used: Linux carries it over from the parent through fork and exec.)"""
    command = [sys.executable, "-m", "ldm.tools.streaming_check", "--measure", kind, "--dir", str(directory),
               "--items", str(items), "--size", str(size), "--workers", str(workers)]
    child = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    peak = 0
    while child.poll() is None:
        peak = max(peak, sum(_proc_kib(pid, "smaps_rollup", "Pss") for pid in _process_tree(child.pid)))
        time.sleep(0.02)
    output, _ = child.communicate()
    if child.returncode:
        raise RuntimeError(f"measuring {kind} failed with status {child.returncode}")
    return {"rss": json.loads(output.strip().splitlines()[-1])["rss"], "pss_with_workers": round(peak / 1024, 1)}


def _process_tree(pid: int) -> list[int]:
    pids, index = [pid], 0
    while index < len(pids):
        for task in Path(f"/proc/{pids[index]}/task").glob("*"):
            try:
                pids += [int(child) for child in (task / "children").read_text().split()]
            except OSError:
                pass
        index += 1
    return pids


def _proc_kib(pid: int | str, name: str, field: str) -> int:
    """A `field: N kB` line of /proc/PID/NAME (0 once the process is gone)."""
    try:
        for line in Path(f"/proc/{pid}/{name}").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _iterate(kind: str, directory: Path, items: int, size: int, workers: int) -> dict:
    if kind != "baseline":
        memory, shards = caches(directory, items, size, kind)
        if kind == "memory":
            loader = DataLoader(memory, batch_size=BATCH, shuffle=True, num_workers=workers, drop_last=True)
        else:
            loader = stream_loader(shards, 0, world=1, workers=workers)
        seen = sum(len(batch["label"]) for batch in loader)
        assert seen == items // BATCH * BATCH, (seen, items)
    return {"rss": round(_proc_kib("self", "status", "VmHWM") / 1024, 1)}


def run_check(directory: Path, items: int = 20_000, size: int = 32) -> dict:
    started = time.monotonic()
    _, shards = caches(directory, items, size)
    report: dict = {"items": items, "build_s": round(time.monotonic() - started, 1),
                    "cache_mib": {path.name: round(_size(path) / 2**20, 1) for path in directory.iterdir()
                                  if path.suffix in (".safetensors", ".litdata")}}
    report["once_per_epoch"] = check_once_per_epoch(shards)
    report["exact_resume"] = [check_resume(shards, rank, done=7) for rank in range(RANKS)]
    report["peak_memory"] = {f"{kind}, {workers} workers": peak_memory(kind, directory, items, size, workers)
                             for kind in ("baseline", "memory", "stream") for workers in (0, WORKERS)
                             if not (kind == "baseline" and workers)}
    return report


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*")) if path.is_dir() else path.stat().st_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=20_000)
    parser.add_argument("--size", type=int, default=32, help="image side in pixels (3 channels)")
    parser.add_argument("--dir", type=Path, default=None, help="where the caches go (default: a temporary folder)")
    parser.add_argument("--workers", type=int, default=WORKERS)
    parser.add_argument("--measure", choices=("baseline", "memory", "stream"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(_iterate(args.measure, args.dir, args.items, args.size, args.workers)))
        return
    if args.dir is None:
        with tempfile.TemporaryDirectory() as directory:
            print(json.dumps(run_check(Path(directory), args.items, args.size), indent=2))
    else:
        args.dir.mkdir(parents=True, exist_ok=True)
        print(json.dumps(run_check(args.dir, args.items, args.size), indent=2))


if __name__ == "__main__":
    main()
