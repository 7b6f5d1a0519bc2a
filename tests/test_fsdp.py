"""FSDP: torch's FSDP and Lightning's strategy need GPUs (on this CPU both refuse), and FSDP keeps only a
shard of every parameter on each rank, which the EMA and the rank-0 sample grids cannot use. Such configs
are refused before anything is built, naming what to use instead; the rest passes."""

from __future__ import annotations

import pytest
import torch
from conftest import compose_config

from ldm.checks.training import check_training
from ldm.utils.errors import ConfigError

# several processes and ports each: these run one after another, in one worker of a parallel suite
pytestmark = pytest.mark.xdist_group("distributed")


def problems(overrides: list[str]) -> list[str]:
    try:
        check_training(compose_config(overrides, output_dir="/tmp/unused"))
    except ConfigError as error:
        return error.errors
    return []


FSDP_OFF = ["callbacks.ema=null", "callbacks.sample_grid=null", "callbacks.noise_levels=null",
            "callbacks.sample_metrics=null"]


def test_fsdp_on_cpus_or_with_whole_parameter_callbacks_is_refused_with_the_alternative():
    found = problems(["trainer=fsdp", "trainer.accelerator=cpu"])
    assert len(found) == 5, found
    assert "trainer.strategy=fsdp needs GPUs" in found[0] and "use trainer=ddp trainer.accelerator=cpu" in found[0]
    for name, what in (("ema", "averages whole parameters"), ("sample_grid", "samples on rank 0 alone"),
                       ("noise_levels", "rank 0 alone"), ("sample_metrics", "unequal shares")):
        line = next(p for p in found if p.startswith(f"callbacks.{name} "))
        assert what in line and "use trainer=ddp" in line and f"callbacks.{name}=null" in line


@pytest.mark.parametrize("strategy", ["ddp_spawn", "ddp_fork", "ddp_notebook", "ddp_spawn_find_unused_parameters_true"])
def test_spawned_copies_are_refused(strategy):
    assert [p for p in problems([f"trainer.strategy={strategy}", "trainer.devices=2"]) if strategy in p]


def test_fsdp_on_gpus_without_them_and_ddp_pass(monkeypatch):
    from lightning.pytorch.accelerators import CUDAAccelerator

    # a machine with two GPUs, as far as the checks can tell
    monkeypatch.setattr(CUDAAccelerator, "is_available", staticmethod(lambda: True))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert problems(["trainer=fsdp", *FSDP_OFF]) == []
    assert problems(["trainer=ddp"]) == []
    assert problems(["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"]) == []
