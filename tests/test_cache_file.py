"""The cache file: built once by concurrent processes, rebuilt when corrupt, never left half-written."""

from __future__ import annotations

import hashlib
import logging
import multiprocessing
import time

import pytest
import torch
from torch.utils.data import Dataset

from ldm.autoencoders.identity import IdentityAutoencoder
from ldm.conditioners import Conditioner
from ldm.data import cache_file
from ldm.data.cache import cached_dataset
from ldm.utils.files import temporary_name


class SlowDataset(Dataset):
    """Deterministic images that take a moment to load, so that two builds would overlap; counts its loads."""

    def __init__(self, length: int = 48, delay: float = 0.005):
        self.length, self.delay, self.loads = length, delay, 0

    def __len__(self) -> int:
        return self.length

    def metadata(self, i: int) -> dict:
        return {"label": i % 10}

    def __getitem__(self, i: int) -> dict:
        self.loads += 1
        time.sleep(self.delay)
        image = torch.linspace(-1, 1, 3 * 4 * 4).reshape(3, 4, 4) * (i + 1) / self.length
        return {"image": image, **self.metadata(i)}


def _cache(dataset: Dataset, cache_dir):
    return cached_dataset(dataset, "train", {"name": "slow"}, IdentityAutoencoder(3), Conditioner(), cache_dir,
                          batch_size=16)


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for key in sorted(tensors):
        digest.update(key.encode() + tensors[key].numpy().tobytes())
    return digest.hexdigest()


def _build_in_child(cache_dir, barrier, results) -> None:
    dataset = SlowDataset()
    barrier.wait()  # both start at once
    cached = _cache(dataset, cache_dir)
    results.put((_digest(cached.tensors), dataset.loads))


def _leftovers(cache_dir) -> list[str]:
    """Files beside the cache other than the cache itself and its lock."""
    return sorted(p.name for p in cache_dir.iterdir() if not p.name.endswith((".safetensors", ".lock")))


def test_two_processes_build_the_cache_once(tmp_path):
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(2), context.Queue()
    workers = [context.Process(target=_build_in_child, args=(tmp_path, barrier, results)) for _ in range(2)]
    for worker in workers:
        worker.start()
    outcomes = [results.get(timeout=240) for _ in workers]
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0
    (digest_a, loads_a), (digest_b, loads_b) = outcomes
    assert digest_a == digest_b
    assert sorted([loads_a, loads_b])[0] == 0, "both processes loaded the images: the cache was built twice"
    assert len(list(tmp_path.glob("*.safetensors"))) == 1
    assert _leftovers(tmp_path) == []
    # and this process reads what they built, without loading an image
    dataset = SlowDataset()
    assert _digest(_cache(dataset, tmp_path).tensors) == digest_a and dataset.loads == 0


def test_truncated_cache_is_rebuilt_with_a_warning(tmp_path, caplog):
    first = _cache(SlowDataset(delay=0), tmp_path)
    (path,) = tmp_path.glob("*.safetensors")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    dataset = SlowDataset(delay=0)
    with caplog.at_level(logging.WARNING, logger=cache_file.__name__):
        again = _cache(dataset, tmp_path)
    assert dataset.loads > 0 and "rebuilding the cache" in caplog.text and path.name in caplog.text
    assert _digest(again.tensors) == _digest(first.tensors)
    assert cache_file.read(path)[0].keys() == first.tensors.keys()  # the file on disk is whole again


def test_cache_of_another_format_is_rebuilt(tmp_path, monkeypatch):
    _cache(SlowDataset(delay=0), tmp_path)
    (path,) = tmp_path.glob("*.safetensors")
    tensors, metadata = cache_file.read(path)
    cache_file.write(path, tensors, {**metadata, "format": "0"})  # what a file name collision would look like
    dataset = SlowDataset(delay=0)
    _cache(dataset, tmp_path)
    assert dataset.loads > 0 and cache_file.read(path)[1]["format"] != "0"


def test_failed_write_leaves_nothing_behind(tmp_path, monkeypatch):
    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as half_written:
            half_written.write(b"\0" * 100)
        raise KeyboardInterrupt

    monkeypatch.setattr(cache_file, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        _cache(SlowDataset(delay=0), tmp_path)
    assert list(tmp_path.glob("*.safetensors")) == [] and _leftovers(tmp_path) == []


def test_stale_temporary_of_a_killed_build_is_removed(tmp_path):
    _cache(SlowDataset(delay=0), tmp_path)
    (path,) = tmp_path.glob("*.safetensors")
    path.unlink()
    stale = temporary_name(path)
    stale.write_bytes(b"half")
    _cache(SlowDataset(delay=0), tmp_path)
    assert path.is_file() and _leftovers(tmp_path) == []
