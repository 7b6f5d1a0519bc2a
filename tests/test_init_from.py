"""A run from another run's weights: `init_from=RUN_DIR` starts from its EMA weights with a fresh optimizer at
step 0, checked before any work; `resume=FILE` with other optimizer settings is refused (it would ignore them)."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY, compose_config, train_run
from probes import StartState

from ldm.checks.training import check_training
from ldm.utils.checkpoint import load_checkpoint
from ldm.utils.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")

RUN = TINY + ["logger=csv", "callbacks.sample_grid=null", "callbacks.sample_metrics=null",
              "callbacks.noise_levels=null", "model.hidden_size=64", "data.batch_size=16",
              "+trainer.limit_val_batches=1", "trainer.max_steps=6", "trainer.val_check_interval=3"]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    out = tmp_path_factory.mktemp("source")
    train_run(RUN, out)
    return out


def test_init_from_starts_from_the_other_runs_ema_weights_with_a_fresh_optimizer(source, tmp_path):
    train_run(RUN + [f"init_from={source}", "optimizer.lr=1e-4", "trainer.max_steps=2", "trainer.val_check_interval=2",
                     "+callbacks.start._target_=probes.StartState"], tmp_path)
    other = load_checkpoint(source / "checkpoints" / "last.ckpt")
    ema = other["ema_state_dict"]
    assert ema and StartState.weights.keys() == ema.keys()
    assert not any(torch.equal(ema[name], other["state_dict"][name]) for name in ema)  # EMA, not the raw weights
    assert all(torch.equal(StartState.weights[name], ema[name]) for name in ema)
    assert StartState.step == 0 and StartState.optimizer_state == {}
    assert load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")["global_step"] == 2


def test_init_from_is_checked_before_any_work(source, tmp_path):
    for overrides, expected in [([f"init_from={tmp_path / 'none'}"], "no such directory"),
                                ([f"init_from={source}", "model.hidden_size=32"], "model.hidden_size=32 but that run"),
                                ([f"init_from={source}", "trainer.max_steps=7", "trainer.val_check_interval=7"], None),
                                ([f"init_from={source}", f"resume={source / 'checkpoints' / 'last.ckpt'}"], "both")]:
        cfg = compose_config(RUN[:-2] + overrides, tmp_path / "new")
        if expected is None:
            check_training(cfg)
            continue
        with pytest.raises(ConfigError, match=expected):
            check_training(cfg)


def test_init_from_refuses_an_unfinished_run(source, tmp_path):
    stored = (source / ".hydra" / "config.yaml").read_text()
    unfinished = tmp_path / "unfinished"
    (unfinished / ".hydra").mkdir(parents=True)
    (unfinished / ".hydra" / "config.yaml").write_text(stored.replace("max_steps: 6", "max_steps: 60"))
    (unfinished / "checkpoints").mkdir()
    (unfinished / "checkpoints" / "last.ckpt").hardlink_to(source / "checkpoints" / "last.ckpt")
    with pytest.raises(ConfigError, match="stopped at step 6 of its trainer.max_steps=60"):
        check_training(compose_config(RUN + [f"init_from={unfinished}"], tmp_path / "new"))


def test_resume_from_another_run_with_a_new_learning_rate_is_refused_pointing_to_init_from(source, tmp_path):
    last = source / "checkpoints" / "last.ckpt"
    with pytest.raises(ConfigError, match=rf"optimizer.lr=0.0001 would not apply: resume={last} continues .*"
                                          rf"made with optimizer.lr=0.0005; .* use init_from={source}"):
        check_training(compose_config(RUN + [f"resume={last}", "optimizer.lr=1e-4"], tmp_path / "new"))
    check_training(compose_config(RUN + [f"resume={last}"], tmp_path / "new"))  # the same settings: continued
