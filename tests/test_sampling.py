"""sample.py rebuilds a run from its directory alone and writes the npz + grid."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import run_script


def test_sample_round_trip(trained_run, tmp_path):
    out = tmp_path / "digits.npz"
    run_script("sample.py", f"run={trained_run}", "n=20", "sampler=heun", "steps=3", "guidance=2.0",
               f"out={out}", "batch_size=8")
    data = np.load(out)
    assert data["images"].dtype == np.uint8 and data["images"].shape == (20, 32, 32, 1)
    assert data["labels"].dtype.kind == "i" and data["labels"].shape == (20,)
    assert np.array_equal(np.bincount(data["labels"]), np.full(10, 2))  # spread evenly over the classes
    assert data["images"].std() > 0
    assert out.with_suffix(".png").is_file()


def test_sample_given_labels_and_seed(trained_run, tmp_path):
    paths = [tmp_path / f"{name}.npz" for name in ("a", "b")]
    for path in paths:
        run_script("sample.py", f"run={trained_run}", "n=4", "steps=2", "labels=[7,3]", "seed=5", f"out={path}")
    a, b = (np.load(p) for p in paths)
    assert a["labels"].tolist() == [7, 3, 7, 3]
    assert np.array_equal(a["images"], b["images"])  # same seed, same samples


def test_sample_rejects_a_directory_that_is_not_a_run(tmp_path):
    with pytest.raises(AssertionError, match="config.yaml not found"):
        run_script("sample.py", f"run={tmp_path}", "n=2")


def test_the_sampler_argument_is_used(trained_run, tmp_path):
    import torch

    from ldm.samplers import Heun
    from ldm.sampling import load_run

    paths = {name: tmp_path / f"{name}.npz" for name in ("euler", "heun")}
    for name, path in paths.items():
        run_script("sample.py", f"run={trained_run}", "n=4", "steps=3", "labels=[2]", "guidance=1.5",
                   f"sampler={name}", f"out={path}")
    euler, heun = (np.load(p)["images"] for p in paths.values())
    assert not np.array_equal(euler, heun)
    _, module = load_run(trained_run)  # the same draw made directly with Heun
    images = module.sample({"label": torch.full((4,), 2)}, 4, sampler=Heun(), steps=3, guidance=1.5,
                           generator=torch.Generator().manual_seed(0))
    from ldm.images import to_uint8

    assert np.abs(to_uint8(images).astype(int) - heun.astype(int)).max() <= 1
