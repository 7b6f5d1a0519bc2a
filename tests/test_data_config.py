"""The data group takes only the keys DataModule names: a misspelled or unknown key is an error."""

from __future__ import annotations

import hydra
import pytest
from conftest import CONF, compose_config
from hydra.errors import InstantiationException

from ldm.checks.keys import config_errors

DATA_CONFIGS = sorted(path.stem for path in (CONF / "data").glob("*.yaml"))


@pytest.mark.parametrize("data", DATA_CONFIGS)
def test_shipped_data_configs_have_no_unknown_keys(data):
    cfg = compose_config([f"data={data}", "root=/nonexistent"])
    assert [error for error in config_errors(cfg) if error.startswith("data.")] == []


@pytest.mark.parametrize("data", DATA_CONFIGS)
def test_an_unknown_data_key_is_an_error_naming_it(data):
    cfg = compose_config([f"data={data}", "+data.batchsize=8"])
    errors = [error for error in config_errors(cfg) if error.startswith("data.")]
    assert len(errors) == 1 and errors[0].startswith("data.batchsize:") and "batch_size" in errors[0]
    # built without the check, it still fails rather than ignoring the key (the datasets left unbuilt)
    with pytest.raises(InstantiationException, match=r"(?s)batchsize.*full_key: data"):
        hydra.utils.instantiate(cfg.data, _recursive_=False)
