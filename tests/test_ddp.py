"""Two ranks on the CPU (gloo): data split without overlap, t and noise per rank, validation reduced over
ranks, files from rank 0 only, exact resume, and the step of 2 ranks x B equal to that of 1 rank x 2B.

The callbacks below are added to real runs through the config (`+callbacks.record._target_=test_ddp....`),
so the rank processes that the launcher starts build them too."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import ROOT, TINY, compose_config, train_run

from ldm.data.digits import DigitsDataset
from ldm.run.build import build_diffusion
from ldm.run.load import load_run
from ldm.utils.checkpoint import load_checkpoint

# several processes and ports each: these run one after another, in one worker of a parallel suite
pytestmark = pytest.mark.xdist_group("distributed")

BATCH = 16
DDP = TINY + ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "data.batch_size=16", "logger=csv",
              "model.hidden_size=64", "trainer.log_every_n_steps=1"]


def fingerprint(image: torch.Tensor) -> str:
    return hashlib.blake2b(image.contiguous().numpy().tobytes(), digest_size=6).hexdigest()


class RecordRanks(L.Callback):
    """Writes, per rank, what it trained on: items and t of each step, its first step, validation losses."""

    def __init__(self, path: str):
        self.path = Path(path)
        self.steps: dict[int, dict] = {}
        self.validations: list[dict] = []
        self.val_batches: list[list[float]] = []
        self.first_step = None
        self.in_validation_step = False

    def setup(self, trainer, pl_module, stage):
        draw, loss = pl_module._draw, pl_module.diffusion_loss

        def recording_draw(batch, generator, sample):
            z0, noise, t = draw(batch, generator, sample)
            if pl_module.training:
                self.steps[pl_module.global_step] = {"items": [fingerprint(x) for x in batch["image"]],
                                                     "t": t.tolist(), "noise": noise.flatten()[:4].tolist()}
            return z0, noise, t

        def recording_loss(z0, *args):
            value = loss(z0, *args)
            if self.in_validation_step:  # (other callbacks may evaluate losses of their own)
                self.val_batches.append([value.item(), z0.shape[0]])
            return value

        pl_module._draw, pl_module.diffusion_loss = recording_draw, recording_loss

    def on_train_start(self, trainer, pl_module):
        self.first_step = trainer.global_step

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self.in_validation_step = True

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.in_validation_step = False

    def on_validation_end(self, trainer, pl_module):
        self.validations.append({"step": trainer.global_step, "batches": self.val_batches,
                                 "val/loss": float(trainer.callback_metrics["val/loss"])})
        self.val_batches = []

    def teardown(self, trainer, pl_module, stage):
        self.path.mkdir(parents=True, exist_ok=True)
        record = {"rank": trainer.global_rank, "world": trainer.world_size, "pid": os.getpid(),
                  "parent": os.getppid(), "first_step": self.first_step, "run_dir": str(trainer.default_root_dir),
                  "schedule": type(pl_module.schedule).__name__, "steps": self.steps, "validations": self.validations}
        (self.path / f"rank{trainer.global_rank}-{secrets.token_hex(3)}.json").write_text(json.dumps(record))


class SharedDraws(L.Callback):
    """Noise and t of every step drawn for the whole global batch from the step number alone; rank r takes
    its block of B. Latents are posterior means. So W ranks x B train on the data, t and noise of 1 x W*B."""

    def setup(self, trainer, pl_module, stage):
        def shared_draw(batch, generator, sample):
            z0 = pl_module.latents(batch, sample=False)
            size, world, rank = z0.shape[0], trainer.world_size, trainer.global_rank
            step = torch.Generator().manual_seed(1000 + pl_module.global_step)
            noise = torch.randn((world * size, *z0.shape[1:]), generator=step)[rank * size:(rank + 1) * size]
            t = pl_module.schedule.sample_t(world * size, generator=step)[rank * size:(rank + 1) * size]
            return z0, noise, t

        pl_module._draw = shared_draw


def records(path: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(path.glob("rank*.json"))]


def record_args(path: Path) -> list[str]:
    return ["+callbacks.record._target_=test_ddp.RecordRanks", f"+callbacks.record.path={path}"]


def one_process_batches(batch: int, steps: range) -> dict[int, list[str]]:
    """What one process with batch `batch` trains on at each step of epoch 0 (the seed-0 permutation)."""
    from ldm.data.order import EpochShuffle

    dataset = DigitsDataset("train", 32)
    order = EpochShuffle(len(dataset), seed=0).permutation(0).tolist()
    return {s: [fingerprint(dataset[i]["image"]) for i in order[s * batch:(s + 1) * batch]] for s in steps}


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run_dir / "checkpoints" / "last.ckpt")["state_dict"]


def test_two_ranks_split_the_data_draw_their_own_noise_reduce_validation_and_resume(tmp_path):
    # 300 validation items in batches of 70: rank 0 gets 3 batches (the last one of 20 items), rank 1 gets 2
    run = DDP + ["trainer.max_steps=4", "trainer.val_check_interval=2", "+data.val_batch_size=70"]
    first, second = tmp_path / "first", tmp_path / "second"
    train_run(run + record_args(first), tmp_path / "run")
    train_run([o for o in run if "max_steps" not in o] + ["trainer.max_steps=6"] + record_args(second),
              tmp_path / "run")
    before, after = records(first), records(second)
    assert sorted(r["rank"] for r in before) == sorted(r["rank"] for r in after) == [0, 1]
    assert all(r["world"] == 2 for r in before + after)
    assert [r["first_step"] for r in after] == [4, 4], "the second run did not resume from step 4 on every rank"

    # every step: rank 0 trains on the first half of one process's batch of 2B, rank 1 on the second half;
    # steps 4 and 5 come from the middle of epoch 0 (46 batches of 32), after the resume
    expected = one_process_batches(2 * BATCH, range(6))
    for part in (before, after):
        by_rank = {r["rank"]: r for r in part}
        for step in map(str, sorted(by_rank[0]["steps"], key=int)):
            items0, items1 = by_rank[0]["steps"][step]["items"], by_rank[1]["steps"][step]["items"]
            assert items0 + items1 == expected[int(step)], f"step {step}: not the global batch of one process"
            assert not set(items0) & set(items1)
            assert by_rank[0]["steps"][step]["t"] != by_rank[1]["steps"][step]["t"], f"step {step}: same t on both"
            assert by_rank[0]["steps"][step]["noise"] != by_rank[1]["steps"][step]["noise"]
    assert sorted(int(s) for r in before for s in r["steps"]) == [0, 0, 1, 1, 2, 2, 3, 3]
    assert sorted(int(s) for r in after for s in r["steps"]) == [4, 4, 5, 5]

    # validation: both ranks report the size-weighted mean over all 300 items, and that is what is logged
    # (Lightning writes a validation at the row of the step before it)
    logged = {int(r["step"]) + 1: float(r["val/loss"]) for r in csv.DictReader(
        open(tmp_path / "run" / "csv" / "version_0" / "metrics.csv")) if r.get("val/loss")}
    for index, step in enumerate((2, 4)):
        rank0, rank1 = (next(r for r in before if r["rank"] == k)["validations"][index] for k in (0, 1))
        assert (len(rank0["batches"]), len(rank1["batches"])) == (3, 2)
        batches = rank0["batches"] + rank1["batches"]
        assert sum(n for _, n in batches) == 300
        exact = sum(loss * n for loss, n in batches) / 300
        print(f"step {step}: val/loss {rank0['val/loss']:.6f} on rank 0, {rank1['val/loss']:.6f} on rank 1, "
              f"size-weighted mean of the 5 batches {exact:.6f}")
        assert rank0["val/loss"] == rank1["val/loss"] == pytest.approx(exact, rel=1e-5)
        assert logged[step] == pytest.approx(exact, rel=1e-5)

    # files: one logger run, grids, and checkpoints, written once (by rank 0)
    run_dir = tmp_path / "run"
    assert [p.name for p in (run_dir / "csv").iterdir()] == ["version_0"]
    assert {p.name for p in (run_dir / "samples").iterdir()} == {"step_000002.png", "step_000004.png",
                                                                  "step_000006.png", "final.png"}
    assert load_checkpoint(run_dir / "checkpoints" / "last.ckpt")["global_step"] == 6
    assert not list(run_dir.rglob("*.partial")), "a checkpoint write was left unfinished"

    # the checkpoint of two ranks loads in one process, for sampling
    _, module = load_run(run_dir, trusted=["test_ddp.RecordRanks"])
    images = module.sample({"label": torch.tensor([1, 7])}, 2, steps=2, generator=torch.Generator().manual_seed(0))
    assert images.shape == (2, 1, 32, 32) and torch.isfinite(images).all()


def child_ranks(pid: int) -> list[int]:
    """Processes started by `pid` (read from /proc)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            children.append(int(stat.parent.name))
    return children


@pytest.mark.slow
def test_killed_ddp_run_ends_with_the_uninterrupted_weights(tmp_path):
    """SIGKILL rank 0 mid-run: rank 1 ends by itself, and the same command again ends as an uninterrupted run."""
    run = DDP + ["trainer.max_steps=10", "trainer.val_check_interval=3", "+trainer.limit_val_batches=1",
                 "callbacks.sample_grid=null", "callbacks.ema.update_starting_at_step=2"]
    train_run(run, tmp_path / "reference")
    killed = tmp_path / "killed"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]), OMP_NUM_THREADS="1")
    process = subprocess.Popen([sys.executable, str(ROOT / "train.py"), f"hydra.run.dir={killed}", *run], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (killed / "checkpoints" / "last.ckpt").is_file():
        assert process.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.05)
    time.sleep(0.5)
    ranks = child_ranks(process.pid)
    assert len(ranks) == 1 and process.poll() is None
    process.send_signal(signal.SIGKILL)
    process.wait()
    deadline = time.time() + 60
    while Path(f"/proc/{ranks[0]}").exists() and time.time() < deadline:  # (a zombie has no cmdline)
        if not Path(f"/proc/{ranks[0]}/cmdline").read_bytes():
            break
        time.sleep(0.2)
    assert not Path(f"/proc/{ranks[0]}/cmdline").exists() or not Path(f"/proc/{ranks[0]}/cmdline").read_bytes(), \
        "rank 1 kept running after rank 0 was killed"
    killed_at = load_checkpoint(killed / "checkpoints" / "last.ckpt")["global_step"]

    train_run(run + record_args(tmp_path / "records"), killed)
    assert {r["first_step"] for r in records(tmp_path / "records")} == {killed_at}
    a, b = load_checkpoint(tmp_path / "reference" / "checkpoints" / "last.ckpt"), \
        load_checkpoint(killed / "checkpoints" / "last.ckpt")
    assert a["global_step"] == b["global_step"] == 10
    worst = max((a[key][k].float() - b[key][k].float()).abs().max().item()
                for key in ("state_dict", "ema_state_dict") for k in a[key])
    print(f"killed at step {killed_at} or later, resumed from {killed_at}: largest weight difference {worst:.3g}")
    assert worst < 1e-5


def test_two_ranks_of_batch_b_take_the_step_of_one_rank_of_batch_2b(tmp_path):
    shared = TINY + ["logger=none", "callbacks.sample_grid=null", "trainer.max_steps=2", "trainer.val_check_interval=2",
                     "+trainer.limit_val_batches=1", "model.hidden_size=64", "diffusion.scale_factor=0.5",
                     "conditioner.embedders.0.drop_rate=0", "+callbacks.shared._target_=test_ddp.SharedDraws",
                     # equal to 1e-6 only in float32: bf16 rounds a batch of 2B and two of B differently
                     "trainer.precision=32-true"]
    one, two = tmp_path / "one", tmp_path / "two"
    train_run(shared + [f"data.batch_size={2 * BATCH}"], one)
    train_run(shared + [f"data.batch_size={BATCH}", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"],
              two)
    a, b = weights(one), weights(two)
    L.seed_everything(0)  # as training does before building the model
    start = build_diffusion(compose_config(shared + [f"data.batch_size={2 * BATCH}"], one)).state_dict()
    assert a.keys() == b.keys()
    difference = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    moved = max((a[k].float() - start[k].float()).abs().max().item() for k in a)
    print(f"after 2 steps: weights moved up to {moved:.3g}; 2 x {BATCH} and 1 x {2 * BATCH} differ by up to "
          f"{difference:.3g}")
    assert moved > 1e-4
    assert difference < 1e-6
