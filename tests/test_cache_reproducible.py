"""The same command gives the same run whether the offline cache existed before it or not: a run that builds
the cache and one that reads it end with bit-identical weights and EMA (at the default precision)."""

from __future__ import annotations

import pytest
import torch
from conftest import train_run

from ldm.utils.checkpoint import load_checkpoint

ARGS = ["trainer.accelerator=cpu", "logger=none", "seed=5", "data.batch_size=32", "model.depth=1",
        "trainer.max_steps=4", "trainer.val_check_interval=4", "+trainer.limit_val_batches=1",
        "callbacks.sample_grid=null", "callbacks.sample_metrics=null", "callbacks.noise_levels=null",
        "callbacks.ema.update_starting_at_step=0"]


def _weights(run_dir) -> dict[str, torch.Tensor]:
    checkpoint = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    return {**{f"weights.{k}": v for k, v in checkpoint["state_dict"].items()},
            **{f"ema.{k}": v for k, v in checkpoint["ema_state_dict"].items()}}


@pytest.mark.parametrize("precision", ["auto", "32-true"])  # auto: bf16 autocast on CPUs with bf16 units
def test_a_run_that_builds_the_cache_trains_as_one_that_reads_it(tmp_path, precision):
    cache = tmp_path / "cache"
    args = ARGS + [f"trainer.precision={precision}"]
    train_run(args + [f"data.cache_dir={cache}"], tmp_path / "builds")
    built = {path: path.stat().st_mtime_ns for path in cache.glob("*.safetensors")}
    assert len(built) == 2  # train and val
    train_run(args + [f"data.cache_dir={cache}"], tmp_path / "reads")
    assert {path: path.stat().st_mtime_ns for path in cache.glob("*.safetensors")} == built  # read, not rebuilt

    builds, reads = _weights(tmp_path / "builds"), _weights(tmp_path / "reads")
    assert builds.keys() == reads.keys()
    differ = [name for name in builds if not torch.equal(builds[name], reads[name])]
    assert not differ, f"{len(differ)} of {len(builds)} tensors differ, e.g. {differ[:3]}"
