"""A run that crashes and is restarted with the same command ends as an uninterrupted one would."""

from __future__ import annotations

import csv

import pytest
import torch
from conftest import TINY, compose_config
from probes import Crash, FirstStep
from safetensors.torch import load_file

from ldm.commands.train import train
from ldm.run.load import build_run
from ldm.utils.checkpoint import POWER_EMA_KEY, load_checkpoint
from ldm.utils.ema_snapshots import list_snapshots

# 64 per batch: 23 batches per epoch of the digits, so the crash at step 30 resumes mid-way through epoch 1
RUN = TINY + ["logger=csv", "data.batch_size=64", "trainer.max_steps=40", "trainer.val_check_interval=10",
              "trainer.log_every_n_steps=1", "callbacks.sample_grid=null", "callbacks.ema.update_starting_at_step=5",
              "callbacks.phema.snapshot_every=4"]


def _losses(run_dir) -> dict[int, float]:
    rows = csv.DictReader(open(run_dir / "csv" / "version_0" / "metrics.csv"))
    return {int(r["step"]): float(r["train/loss"]) for r in rows if r.get("train/loss")}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    train(compose_config(RUN, out))
    return out


def test_crashed_and_restarted_run_matches_an_uninterrupted_one(uninterrupted, tmp_path):
    with pytest.raises(Crash):
        train(compose_config(RUN + ["+callbacks.crash._target_=probes.CrashAt", "+callbacks.crash.step=33"], tmp_path))
    assert load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")["global_step"] == 30
    # a snapshot written after the checkpoint's step belongs to the crashed run, not to the one that resumes
    phema = tmp_path / "checkpoints" / "phema"
    assert (phema / "snapshot-0000032.safetensors").is_file()
    (phema / "snapshot-0000034.safetensors").write_bytes((phema / "snapshot-0000032.safetensors").read_bytes())
    # the same command again (resume=auto), with a probe of where training starts
    train(compose_config(RUN + ["+callbacks.first._target_=probes.FirstStep"], tmp_path))
    assert FirstStep.seen == 30

    expected, got = _losses(uninterrupted), _losses(tmp_path)
    assert sorted(got) == sorted(expected) and len(got) >= 39  # one row per step, none repeated or missing
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6), f"step {step}"
    a = load_checkpoint(uninterrupted / "checkpoints" / "last.ckpt")
    b = load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert a["global_step"] == b["global_step"] == 40
    for key in ("state_dict", "ema_state_dict"):
        assert a[key].keys() == b[key].keys()
        worst = max((a[key][k].float() - b[key][k].float()).abs().max().item() for k in a[key])
        assert worst < 1e-5, f"{key} differs by {worst}"
    # the post-hoc EMA: its tracked averages in the checkpoint, and the same snapshots, of the trainable weights only
    for x, y in zip(a[POWER_EMA_KEY]["averages"], b[POWER_EMA_KEY]["averages"], strict=True):
        assert x.keys() == y.keys() == a["ema_state_dict"].keys()
        assert max((x[k] - y[k]).abs().max().item() for k in x) < 1e-5
    expected, got = (list_snapshots(run / "checkpoints" / "phema") for run in (uninterrupted, tmp_path))
    assert [s.step for s in got] == [s.step for s in expected] == [*range(4, 41, 4)]
    for x, y in zip(expected, got, strict=True):
        x, y = load_file(x.path), load_file(y.path)
        assert x.keys() == y.keys() and max((x[k] - y[k]).abs().max().item() for k in x) < 1e-5


def test_a_tracked_post_hoc_ema_length_loads_as_its_last_snapshot(uninterrupted):
    """`ema_length` equal to a tracked length gives that average at the last step, in the trainable weights only."""
    module = build_run(compose_config(RUN, uninterrupted), uninterrupted, "last", "cpu", ema_length=0.05)
    last = load_file(list_snapshots(uninterrupted / "checkpoints" / "phema")[-1].path)
    weights = {name: p for name, p in module.named_parameters() if p.requires_grad}
    assert {f"0/{name}" for name in weights} == {key for key in last if key.startswith("0/")}
    assert max((weights[name] - last[f"0/{name}"]).abs().max().item() for name in weights) < 1e-5
    plain = build_run(compose_config(RUN, uninterrupted), uninterrupted, "last", "cpu")
    assert any(not torch.equal(p, weights[name]) for name, p in plain.named_parameters() if name in weights)


def test_a_crashed_lora_run_resumes_to_the_same_adapters_bit_for_bit(trained_run, tmp_path):
    """A LoRA run on the shared trained run: its checkpoints hold the adapters only, and a restart from them ends
    with the adapters, their EMA and optimizer state of an uninterrupted run, exactly."""
    lora = TINY + ["logger=csv", "trainer.max_steps=12", "trainer.val_check_interval=4", "callbacks.sample_grid=null",
                   "callbacks.sample_metrics=null", "callbacks.noise_levels=null", "+trainer.limit_val_batches=1",
                   "callbacks.ema.update_starting_at_step=2", "finetune=lora", f"init_from={trained_run}"]
    train(compose_config(lora, tmp_path / "uninterrupted"))
    with pytest.raises(Crash):
        train(compose_config(lora + ["+callbacks.crash._target_=probes.CrashAt", "+callbacks.crash.step=10"],
                             tmp_path / "crashed"))
    assert load_checkpoint(tmp_path / "crashed" / "checkpoints" / "last.ckpt")["global_step"] == 8
    train(compose_config(lora + ["+callbacks.first._target_=probes.FirstStep"], tmp_path / "crashed"))
    assert FirstStep.seen == 8
    a = load_checkpoint(tmp_path / "uninterrupted" / "checkpoints" / "last.ckpt")
    b = load_checkpoint(tmp_path / "crashed" / "checkpoints" / "last.ckpt")
    assert a["global_step"] == b["global_step"] == 12
    assert any(".lora_B." in key and value.abs().max() > 0 for key, value in a["state_dict"].items())  # it trained
    for key in ("state_dict", "ema_state_dict"):
        assert a[key].keys() == b[key].keys() and all(".lora_" in name or name.startswith("latent_") for name in a[key])
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key} {name}"
    for index, state in a["optimizer_states"][0]["state"].items():
        for name, value in state.items():
            assert torch.equal(value, b["optimizer_states"][0]["state"][index][name]), f"optimizer {index} {name}"
