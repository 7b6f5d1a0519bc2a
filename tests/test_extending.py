"""The README's "add a parameterization" guide, followed: a new method in a few lines works everywhere.

The method here is not shipped: a variance-preserving line in the variance, alpha^2 = 1 - t and
sigma^2 = t, with the v target. It is the whole method file; the YAML would be `_target_` plus the
parts' defaults list, as conf/schedule/trig.yaml.
"""

import hydra
import pytest
import torch
from omegaconf import OmegaConf
from test_samplers import (
    COV_TOL,
    MEAN_TOL,
    SAMPLERS,
    STEPS,
    assert_reproduces_gaussian,
    run,
)

from ldm.schedules import LogitNormal, MinSNRWeight, Parameterization

pytestmark = pytest.mark.usefixtures("one_thread")


class SqrtVP(Parameterization):
    """x_t = sqrt(1 - t) x0 + sqrt(t) noise; target = v = alpha noise - sigma x0."""

    def alpha_sigma(self, t):
        return (1 - t).sqrt(), t.sqrt()

    def model_row(self, t):
        alpha, sigma = self.alpha_sigma(t)
        return -sigma, alpha


def test_it_builds_and_the_same_rows_with_a_singular_target_do_not():
    SqrtVP()  # the base constructor ran the invertibility check

    class SqrtVPNoise(SqrtVP):  # epsilon target: at t = 1 (alpha = 0) x_t is the noise itself
        def model_row(self, t):
            return torch.zeros_like(t), torch.ones_like(t)

    with pytest.raises(ValueError, match="not invertible at t=1"):
        SqrtVPNoise()


def test_it_takes_any_time_sampler_and_loss_weight_from_a_config():
    cfg = OmegaConf.create({
        "_target_": f"{__name__}.SqrtVP",
        "time_sampler": {"_target_": "ldm.schedules.time_samplers.LogitNormal", "mean": 0.0, "std": 1.0},
        "loss_weight": "min_snr",
    })
    p = hydra.utils.instantiate(cfg)
    assert p.time_sampler == LogitNormal() and p.weighting == MinSNRWeight()
    t = p.sample_t(64, torch.Generator().manual_seed(0))
    assert (t > 0).all() and (t < 1).all() and torch.isfinite(p.loss_weight(t)).all()


@pytest.mark.parametrize("sampler_name", SAMPLERS)
def test_every_sampler_reproduces_gaussian_data(sampler_name):
    """The same check and tolerances as the shipped methods in tests/test_samplers.py."""
    sampler = SAMPLERS[sampler_name]
    out = run(sampler, SqrtVP(), STEPS[sampler_name])
    assert_reproduces_gaussian(out, MEAN_TOL, COV_TOL["stochastic" if sampler.stochastic else "deterministic"])


def test_it_trains_in_the_app_and_samples_with_every_sampler(tmp_path):
    from conftest import TINY, compose_config

    from ldm.commands.train import train
    from ldm.run.load import load_run

    cfg = compose_config(TINY + ["logger=none", "callbacks.sample_grid=null", "trainer.max_steps=20",
                                 "trainer.val_check_interval=10"], tmp_path)
    cfg.schedule = OmegaConf.create({"_target_": "test_extending.SqrtVP"})  # what its one yaml would hold
    (tmp_path / ".hydra").mkdir()
    OmegaConf.save(cfg, tmp_path / ".hydra" / "config.yaml")
    loss = train(cfg)
    assert loss is not None and torch.isfinite(torch.tensor(loss))
    _, module = load_run(tmp_path, trusted=["test_extending.SqrtVP"])
    assert isinstance(module.schedule, SqrtVP)
    labels = {"label": torch.tensor([0, 5])}
    for name, sampler in SAMPLERS.items():
        images = module.sample(labels, 2, sampler=sampler, steps=4, guidance=2.0,
                               generator=torch.Generator().manual_seed(0))
        assert images.shape == (2, 1, 32, 32) and torch.isfinite(images).all(), name
