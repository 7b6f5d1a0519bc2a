"""Config keys are checked against the constructors they are passed to: a typo in any group is an error."""

from __future__ import annotations

import pkgutil

import pytest
import yaml
from conftest import CONF, compose_config

from ldm.checks.keys import ConfigError, accepted_keys, check_config, check_keys, config_errors

# (overrides, the start of the expected message): one misspelled key per config group
MISSPELLED = [
    (["+model.hidden_sise=64"], "model.hidden_sise: unknown key for ldm.models.dit.DiT; did you mean hidden_size?"),
    (["model=unet", "+model.num_res_block=2"], "model.num_res_block: unknown key for ldm.models.unet.UNet; "
                                               "did you mean num_res_blocks?"),
    (["+autoencoder.weight=x"], "autoencoder.weight: unknown key for ldm.autoencoders.kl.KLAutoencoder; "
                                "did you mean weights?"),
    (["+conditioner.vectordim=8"], "conditioner.vectordim: unknown key for ldm.conditioners.Conditioner; "
                                   "did you mean vector_dim?"),
    (["+conditioner.embedders.0.drop_rat=0.2"],
     "conditioner.embedders.0.drop_rat: unknown key for ldm.conditioners.class_embedder.ClassEmbedder; "
     "did you mean drop_rate?"),
    (["+schedule.shfit=3.0"], "schedule.shfit: unknown key for ldm.schedules.RectifiedFlow; did you mean shift?"),
    (["sampler=euler_ancestral", "+sampler.etaa=0.5"], "sampler.etaa: unknown key for ldm.samplers.EulerAncestral; "
                                                       "did you mean eta?"),
    (["+data.batchsize=8"], "data.batchsize: unknown key for ldm.data.datamodule.DataModule; did you mean batch_size"),
    (["+data.train.splt=val"], "data.train.splt: unknown key for ldm.data.digits.DigitsDataset; did you mean split?"),
    (["+trainer.max_step=10"], "trainer.max_step: unknown key for lightning.pytorch.Trainer; did you mean max_steps"),
    (["+callbacks.model_checkpoint.montor=val/loss"],
     "callbacks.model_checkpoint.montor: unknown key for lightning.pytorch.callbacks.ModelCheckpoint; "
     "did you mean monitor?"),
    (["logger=csv", "+logger.csv.nmae=x"], "logger.csv.nmae: unknown key for ldm.run.loggers.ContinuedCSVLogger; "
                                           "did you mean name?"),
]


@pytest.mark.parametrize("overrides,message", MISSPELLED, ids=[o[-1].split("=")[0] for o, _ in MISSPELLED])
def test_misspelled_key_names_key_group_and_the_right_name(overrides, message):
    with pytest.raises(ConfigError) as caught:
        check_config(compose_config(overrides))
    [error] = caught.value.errors
    assert error.startswith(message), error


def test_every_mistake_in_one_message():
    cfg = compose_config(["+model.depht=2", "+data.val.splt=train", "+trainer.max_epoch=1"])
    with pytest.raises(ConfigError) as caught:
        check_config(cfg)
    assert [line.split(":")[0] for line in caught.value.errors] == ["data.val.splt", "model.depht", "trainer.max_epoch"]
    assert all(line in str(caught.value) for line in caught.value.errors)


def test_key_without_close_match_lists_what_the_target_takes():
    [message] = config_errors(compose_config(["+sampler.order=2"]))
    assert message == "sampler.order: unknown key for ldm.samplers.Euler; it takes no arguments"


def test_nodes_the_code_builds_and_arguments_it_passes():
    def settings(denoiser, lr: float = 1e-3, warmup_steps: int = 0):
        return denoiser, lr, warmup_steps

    name = f"{__name__}.{settings.__qualname__}"
    cfg = {"diffusion": {"lr": 0.1, "lrr": 0.1, "denoiser": "x"},
           "trainer": {"_target_": "lightning.pytorch.Trainer", "max_steps": 10, "callbacks": []}}
    errors = config_errors(cfg, targets={"diffusion": settings},
                           passed_by_code={"diffusion": ["denoiser"], "trainer": ["callbacks", "logger"]})
    assert errors == [
        f"diffusion.lrr: unknown key for {name}; did you mean lr?",
        f"diffusion.denoiser: set by the code for {name}, not by the config; remove it",
        "trainer.callbacks: set by the code for lightning.pytorch.Trainer, not by the config; remove it",
    ]
    assert check_keys({"lr": 1.0, "_target_": "x", "_partial_": True}, settings, "diffusion") == []


def test_what_cannot_be_judged_is_accepted():
    def open_ended(size: int = 1, **options):
        return size, options

    class Checked(type):
        def __call__(cls, *args, **kwargs):
            return super().__call__(*args, **kwargs)

    class WithMetaclass(metaclass=Checked):
        def __init__(self, size: int = 1):
            self.size = size

    assert accepted_keys(open_ended) is None and check_keys({"anything": 1}, open_ended, "x") == []
    assert accepted_keys(print) is None or "sep" in accepted_keys(print)
    # a metaclass's (*args, **kwargs) must not hide the constructor's own arguments
    assert accepted_keys(WithMetaclass) == {"size"}


def test_unimportable_target_is_named():
    [message] = config_errors({"model": {"_target_": "ldm.models.ditt.DiT", "depth": 2}})
    assert message.startswith("model._target_=ldm.models.ditt.DiT: cannot be imported")


def test_project_targets_take_explicit_arguments():
    """A project constructor with **kwargs would let every typo in its config node pass unnoticed."""
    targets = set()

    def collect(value):
        if isinstance(value, dict):
            targets.add(value.get("_target_"))
            for child in value.values():
                collect(child)
        elif isinstance(value, list):
            for child in value:
                collect(child)

    for path in CONF.rglob("*.yaml"):
        collect(yaml.safe_load(path.read_text()))
    own = sorted(target for target in targets if isinstance(target, str) and target.startswith("ldm."))
    open_ended = [target for target in own if accepted_keys(pkgutil.resolve_name(target)) is None]
    assert not open_ended, f"take **kwargs, so typos in their config pass: {open_ended}"
