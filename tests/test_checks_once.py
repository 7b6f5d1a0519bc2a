"""Each check runs once per command: under Hydra with the check callback configured (the default of train.py,
sample.py and evaluate.py) the config was checked before the job started, so the command does not check again;
called directly (tests, notebooks) or with the callback switched off, the command checks it itself."""

from __future__ import annotations

import pytest
from conftest import CONF, TINY, compose_config
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

import ldm.commands.train
from ldm.checks.hydra import (
    CheckEmaConfig,
    CheckEvaluationConfig,
    CheckSamplingConfig,
    CheckTrainingConfig,
    checked_by_hydra,
)


@pytest.fixture
def hydra_job():
    """What Hydra sets while a job of `config_name` runs: its own config, callbacks included."""
    def start(config_name: str, callbacks: bool = True):
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose(config_name, return_hydra_config=True)
        if not callbacks:
            with open_dict(cfg.hydra):
                cfg.hydra.callbacks = {}
        HydraConfig.instance().set_config(cfg)

    yield start
    HydraConfig.instance().cfg = None


def test_outside_hydra_nothing_counts_as_checked():
    assert not HydraConfig.initialized()
    assert not checked_by_hydra(CheckTrainingConfig)


@pytest.mark.parametrize("config_name, callback", [("train", CheckTrainingConfig), ("sample", CheckSamplingConfig),
                                                   ("evaluate", CheckEvaluationConfig), ("ema", CheckEmaConfig)])
def test_each_command_is_checked_by_its_own_callback(hydra_job, config_name, callback):
    hydra_job(config_name)
    assert checked_by_hydra(callback)
    others = {CheckTrainingConfig, CheckSamplingConfig, CheckEvaluationConfig, CheckEmaConfig} - {callback}
    assert not any(checked_by_hydra(other) for other in others)


def test_with_the_callback_switched_off_the_command_checks(hydra_job):
    hydra_job("train", callbacks=False)
    assert not checked_by_hydra(CheckTrainingConfig)


def test_train_checks_a_config_itself_when_called_directly(tmp_path, monkeypatch):
    calls = []

    def counted(cfg):
        calls.append(cfg)
        raise RuntimeError("stop after the check")

    monkeypatch.setattr(ldm.commands.train, "check_training", counted)
    with pytest.raises(RuntimeError, match="stop after the check"):
        ldm.commands.train.train(compose_config(TINY, tmp_path))
    assert len(calls) == 1
