"""Gradient accumulation: N batches of B make one optimizer step, trained as one batch of N * B would be.

Steps count optimizer steps whatever N: validation, sample grids, the EMA, the LR schedule, last.ckpt, and
a crashed run restarted mid-way ends as an uninterrupted one."""

from __future__ import annotations

import csv
from types import SimpleNamespace

import pytest
import torch
from conftest import TINY, compose_config
from probes import Crash, FirstStep, GradNorms, RecordWeights, Validations

from ldm.callbacks.last_checkpoint import LastCheckpoint
from ldm.commands.train import train
from ldm.data.order import EpochShuffle
from ldm.tasks.diffusion import LatentDiffusion
from ldm.utils.checkpoint import load_checkpoint

# 1497 digits: 23 batches of 64 (11 steps of 2, the 23rd dropped) or 11 of 128 per epoch, so 15 steps cross an epoch
RUN = TINY + ["logger=csv", "trainer.precision=32-true", "trainer.max_steps=15", "trainer.val_check_interval=5",
              "trainer.log_every_n_steps=1", "+trainer.limit_val_batches=1", "conditioner=none",
              "callbacks.sample_metrics=null", "callbacks.noise_levels=null", "lr_scheduler=warmup_cosine",
              "lr_scheduler.warmup_steps=3", "callbacks.ema.update_starting_at_step=3",
              # a fixed latent scale: the measured one draws posterior samples from the global generator
              "diffusion.scale_factor=0.6"]
ACCUMULATED = RUN + ["data.batch_size=64", "trainer.accumulate_grad_batches=2"]
PROBES = ["+callbacks.grads._target_=probes.GradNorms", "+callbacks.weights._target_=probes.RecordWeights",
          "+callbacks.validations._target_=probes.Validations"]


def _item_draw(self, batch, generator, sample):
    """Latents, noise and times that depend on the item and the step alone, not on how a step's items are
    split into batches (training's own draws come from one generator per batch)."""
    z0 = self.latents(batch, sample=False)
    pixels = ((batch["image"].flatten(1) + 1) * 127.5).round().long()
    keys = (pixels * torch.arange(1, pixels.shape[1] + 1)).sum(1) % 1_000_003
    noise, t = [], []
    for key in keys.tolist():
        generator = torch.Generator().manual_seed(key * 100_000 + self.global_step)
        noise.append(torch.randn(z0.shape[1:], generator=generator))
        t.append(self.schedule.sample_t(1, generator=generator))
    return z0, torch.stack(noise).to(z0), torch.cat(t).to(z0.device, torch.float32)


def _probed_run(overrides: list[str], out) -> dict:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(LatentDiffusion, "_draw", _item_draw)
        train(compose_config(overrides + PROBES, out))
    return {"grads": list(GradNorms.seen), "weights": dict(RecordWeights.last), "validations": list(Validations.seen),
            "checkpoint": load_checkpoint(out / "checkpoints" / "last.ckpt")}


@pytest.fixture(scope="module")
def accumulated(tmp_path_factory):
    out = tmp_path_factory.mktemp("accumulated")
    return out, _probed_run(ACCUMULATED, out)


@pytest.fixture(scope="module")
def one_batch(tmp_path_factory):
    out = tmp_path_factory.mktemp("one_batch")
    return out, _probed_run(RUN + ["data.batch_size=128"], out)


def test_two_batches_of_b_train_as_one_of_2b(accumulated, one_batch):
    (_, a), (_, b) = accumulated, one_batch
    # the mean of the two batches' gradients (a sum would be twice as large), at every optimizer step
    assert len(a["grads"]) == len(b["grads"]) == 15
    assert a["grads"] == pytest.approx(b["grads"], rel=1e-4)
    assert a["weights"].keys() == b["weights"].keys()
    for name in a["weights"]:
        torch.testing.assert_close(a["weights"][name], b["weights"][name], rtol=1e-4, atol=1e-5, msg=name)
    assert a["checkpoint"]["global_step"] == b["checkpoint"]["global_step"] == 15
    for name, value in a["checkpoint"]["ema_state_dict"].items():
        torch.testing.assert_close(value, b["checkpoint"]["ema_state_dict"][name], rtol=1e-4, atol=1e-5, msg=name)


def test_validation_and_grids_at_the_configured_optimizer_steps(accumulated):
    out, a = accumulated
    # after whole optimizer steps (an even number of this epoch's batches), the last one where training ends
    assert a["validations"] == [(5, 10), (10, 20), (15, 8)]
    assert sorted(p.name for p in (out / "samples").glob("step_*.png")) == [
        "step_000005.png", "step_000010.png", "step_000015.png"]
    rows = list(csv.DictReader(open(out / "csv" / "version_0" / "metrics.csv")))
    # Lightning logs validation at the step before it is counted, as without accumulation
    assert [int(r["step"]) for r in rows if r.get("val/loss")] == [4, 9, 14]
    assert sorted({int(r["step"]) for r in rows if r.get("train/loss")}) == list(range(15))


def test_crashed_accumulating_run_resumes_exactly(accumulated, tmp_path):
    """Training's own draws (no patch): a crash at step 12 resumes from step 10, mid-way through epoch 0."""
    uninterrupted = tmp_path / "uninterrupted"
    train(compose_config(ACCUMULATED, uninterrupted))
    crashed = tmp_path / "crashed"
    with pytest.raises(Crash):
        train(compose_config(ACCUMULATED + ["+callbacks.crash._target_=probes.CrashAt", "+callbacks.crash.step=12"],
                             crashed))
    assert load_checkpoint(crashed / "checkpoints" / "last.ckpt")["global_step"] == 10
    train(compose_config(ACCUMULATED + ["+callbacks.first._target_=probes.FirstStep"], crashed))
    assert FirstStep.seen == 10
    a = load_checkpoint(uninterrupted / "checkpoints" / "last.ckpt")
    b = load_checkpoint(crashed / "checkpoints" / "last.ckpt")
    assert a["global_step"] == b["global_step"] == 15
    for key in ("state_dict", "ema_state_dict"):
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key} {name}"


def test_an_epoch_holds_whole_optimizer_steps():
    # 1497 items in batches of 64 are 23 batches; accumulating 2, the 23rd is dropped: 11 steps, as batch 128 takes
    one_step_of_128 = list(EpochShuffle(1497, seed=3, batch_size=128))
    order = EpochShuffle(1497, seed=3, batch_size=64, accumulate=2)
    assert len(order) == 22 * 64 and list(order) == one_step_of_128
    order.resume_at(0, 10 * 64)  # resumed after 5 steps
    assert list(order) == one_step_of_128[640:]
    ranks = [list(EpochShuffle(1497, 3, batch_size=32, rank=rank, world_size=2, accumulate=2)) for rank in (0, 1)]
    assert sorted(ranks[0] + ranks[1]) == sorted(one_step_of_128)


def test_a_requeue_saves_only_after_whole_optimizer_steps(tmp_path):
    def trainer(ready: int):
        progress = SimpleNamespace(current=SimpleNamespace(ready=ready))
        return SimpleNamespace(accumulate_grad_batches=2, global_step=ready // 2,
                               fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(batch_progress=progress)))

    saved = []
    callback = LastCheckpoint(str(tmp_path))
    callback._save = lambda trainer: saved.append(trainer.fit_loop.epoch_loop.batch_progress.current.ready)
    callback._stop = SimpleNamespace(due=lambda trainer: True, hand_over=lambda step, path: None)
    for ready in (1, 2, 3):  # batches of this epoch trained on
        callback.on_train_batch_end(trainer(ready), None, None, None, ready - 1)
    assert saved == [2]
