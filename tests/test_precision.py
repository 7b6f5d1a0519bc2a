"""`trainer.precision=auto`: bf16 autocast where the device has bf16 units, and bf16 training as good as fp32."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY, train_run

import ldm.run.build
from ldm.run.build import resolve_precision


@pytest.mark.parametrize(("accelerator", "cuda", "cuda_bf16", "cpu_bf16", "expected"), [
    ("cpu", False, False, True, "bf16-mixed"),     # AMX / AVX512-BF16: bf16 matmuls about twice as fast
    ("cpu", False, False, False, "32-true"),       # bf16 emulated: slower than fp32
    ("auto", False, False, True, "bf16-mixed"),
    ("auto", True, True, False, "bf16-mixed"),     # a GPU is what auto picks
    ("auto", True, False, True, "32-true"),        # a GPU without bf16 (pre-Ampere)
    ("gpu", True, True, False, "bf16-mixed"),
    ("cpu", True, True, False, "32-true"),         # the CPU asked for, beside a GPU: the CPU's own answer
    ("mps", False, False, True, "32-true"),
])
def test_auto_precision_follows_the_device(monkeypatch, accelerator, cuda, cuda_bf16, cpu_bf16, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: cuda_bf16)
    monkeypatch.setattr(ldm.run.build, "cpu_has_bf16_units", lambda: cpu_bf16)
    assert resolve_precision("auto", accelerator) == expected
    assert resolve_precision("16-mixed", accelerator) == "16-mixed"  # anything named is kept


class Built(Exception):
    """Stops the run once the trainer has its arguments."""


def test_training_hands_the_trainer_the_precision_for_its_accelerator(tmp_path, monkeypatch):
    import lightning.pytorch as pl

    monkeypatch.setattr(ldm.run.build, "cpu_has_bf16_units", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # auto would pick a GPU with bf16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    given = []

    def recording(self, *args, **kwargs):
        given.append(kwargs["precision"])
        raise Built

    monkeypatch.setattr(pl.Trainer, "__init__", recording)
    for accelerator in ("cpu", "auto"):
        with pytest.raises(Exception, match="Built"):  # Hydra wraps it
            train_run(TINY + ["logger=none", f"trainer.accelerator={accelerator}"], tmp_path / accelerator)
    assert given == ["32-true", "bf16-mixed"]  # the run's accelerator, not whatever the machine has


@pytest.mark.slow
def test_bf16_training_of_the_digits_default_reaches_the_accuracy_of_fp32(tmp_path):
    """The default recipe, shortened to 1,000 steps, in both precisions: the digits classifier's accuracy and
    fd_digits of 500 samples with the EMA weights."""
    from conftest import digits_accuracy

    from ldm.run.load import load_run

    scores = {}
    for precision in ("32-true", "bf16-mixed"):
        out = tmp_path / precision
        train_run(["logger=none", "callbacks.sample_metrics=null", "callbacks.sample_grid=null",
                   "trainer.max_steps=1000", "trainer.val_check_interval=1000", f"trainer.precision={precision}"], out)
        _, module = load_run(out)
        labels = torch.arange(500) % 10
        images = module.sample({"label": labels}, 500, steps=25, guidance=2.0,
                               generator=torch.Generator().manual_seed(0))
        scores[precision] = digits_accuracy(images, labels.numpy())
    print(f"digit accuracy after 1000 steps: {scores}")
    assert scores["32-true"] > 0.9
    assert scores["bf16-mixed"] >= scores["32-true"] - 0.02, scores
