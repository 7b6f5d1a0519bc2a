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

    from ldm.run.load import load_run
    from ldm.samplers import Heun

    paths = {name: tmp_path / f"{name}.npz" for name in ("euler", "heun")}
    for name, path in paths.items():
        run_script("sample.py", f"run={trained_run}", "n=4", "steps=3", "labels=[2]", "guidance=1.5",
                   f"sampler={name}", f"out={path}")
    euler, heun = (np.load(p)["images"] for p in paths.values())
    assert not np.array_equal(euler, heun)
    _, module = load_run(trained_run)  # the same draw made directly with Heun
    images = module.sample({"label": torch.full((4,), 2)}, 4, sampler=Heun(), steps=3, guidance=1.5,
                           generator=torch.Generator().manual_seed(0))
    from ldm.utils.images import to_uint8

    assert np.abs(to_uint8(images).astype(int) - heun.astype(int)).max() <= 1


def test_guidance_defaults_to_the_runs_sample_guidance(trained_run, tmp_path):
    """As evaluate.py: without guidance=, sample.py guides like the run's own sample grids."""
    import torch

    from ldm.run.load import load_run
    from ldm.utils.images import to_uint8

    out = tmp_path / "default.npz"
    run_script("sample.py", f"run={trained_run}", "n=4", "steps=3", "labels=[2]", f"out={out}")
    drawn = np.load(out)["images"].astype(int)
    _, module = load_run(trained_run)
    assert module.sample_guidance != 1.0
    made = {scale: to_uint8(module.sample({"label": torch.full((4,), 2)}, 4, steps=3, guidance=scale,
                                          generator=torch.Generator().manual_seed(0))).astype(int)
            for scale in (module.sample_guidance, 1.0)}
    assert np.abs(made[module.sample_guidance] - drawn).max() <= 1
    assert np.abs(made[1.0] - drawn).max() > 1


# ---- the arguments are checked before the model is built -----------------------------------------

def _sample_in_process(trained_run, tmp_path, monkeypatch, *overrides):
    """Run `sample(cfg)` with building the model replaced by a failure: what passes reaches the build."""
    from conftest import compose_config

    import ldm.commands.sample

    def no_build(*args, **kwargs):
        raise RuntimeError("the model was built")
    monkeypatch.setattr(ldm.commands.sample, "build_run", no_build)
    cfg = compose_config([f"run={trained_run}", f"out={tmp_path / 'out.npz'}", *overrides], name="sample")
    return ldm.commands.sample.sample(cfg)


@pytest.mark.parametrize("override, key", [
    ("prompts='a small red circle'", "prompts="),   # one string, not a list: was one prompt per character
    ("labels=[3,12]", "labels="),                   # the digits run has classes 0..9
    ("labels=3", "labels="),
    ("steps=0", "steps="),                          # was: the run's own step count
    ("n=0", "n="),
    ("batch_size=-1", "batch_size="),
    ("guidance=-1", "guidance.scale="),
])
def test_bad_arguments_fail_before_the_model_is_built(trained_run, tmp_path, monkeypatch, override, key):
    from ldm.utils.errors import ConfigError

    with pytest.raises(ConfigError) as caught:
        _sample_in_process(trained_run, tmp_path, monkeypatch, override)
    assert key in str(caught.value)


def test_guidance_zero_is_allowed(trained_run, tmp_path, monkeypatch):
    with pytest.raises(RuntimeError, match="the model was built"):
        _sample_in_process(trained_run, tmp_path, monkeypatch, "guidance=0")


def test_progress_shows_one_line_per_batch_when_piped(trained_run, tmp_path):
    result = run_script("sample.py", f"run={trained_run}", "n=5", "batch_size=2", "steps=1",
                        f"out={tmp_path / 'out.npz'}")
    lines = [line for line in (result.stdout + result.stderr).splitlines() if "sampled " in line]
    assert [line.split("sampled ")[1].strip() for line in lines] == ["2/5", "4/5", "5/5"]
