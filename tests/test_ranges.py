"""Every numeric argument of every target the configs can name has a declared range, and a value out of it is
refused by the config check, before any work.

The targets are collected by composing every option of every config group (conf/schedule's time_sampler
and loss_weight too, and conf/metrics through evaluate.yaml); their numeric arguments (an int or float
default or annotation) come from their signatures, Lightning's Trainer included, whether a shipped config
sets them or not.
"""

from __future__ import annotations

import functools
import inspect
import math
import pkgutil
import re
from collections import Counter

import pytest
from conftest import CONF, compose_config
from omegaconf import DictConfig, OmegaConf, open_dict

from ldm.checks.evaluation import evaluation_problems
from ldm.checks.keys import HYDRA_KEYS
from ldm.checks.ranges import BUILT_BY_CODE, RANGES, Devices, Duration, OneOf, StepsOrFraction, target_name
from ldm.checks.training import check_training
from ldm.utils.errors import ConfigError

# options of these groups are composed together, the i-th of each in one config (a config check reports each key
# on its own, so unrelated options can share a config); the others one option at a time
JOINED = ["data", "autoencoder", "conditioner", "model", "schedule", "sampler", "guidance", "trainer", "callbacks",
          "logger", "hparams_search", "launcher", "debug", "optimizer", "lr_scheduler"]
ALONE = ["schedule/time_sampler", "schedule/loss_weight", "task", "experiment"]
# presets that start from published weights: the keys they leave for the user to give
NEEDS = {"experiment=dit_xl2_256": ["dit_weights=/weights/dit.pt", "vae_weights=/weights/vae"],
         "experiment=sd15_finetune": ["pretrained_dir=/weights/sd15"]}
NUMERIC_ANNOTATION = re.compile(r"\b(int|float)\b|Literal\[\d")


def choices(group: str, config: str = "train") -> list[list[str]]:
    return [[f"{group}={path.stem}", *NEEDS.get(f"{group}={path.stem}", [])]
            for path in sorted((CONF / group).glob("*.yaml"))]


@functools.cache
def compositions() -> list[tuple[str, tuple[str, ...], DictConfig]]:
    """(config name, overrides, composed config) that together hold every option of every group of conf/."""
    joined = {group: choices(group) for group in JOINED}
    rounds = [[override for options in joined.values() if i < len(options) for override in options[i]]
              for i in range(max(map(len, joined.values())))]
    rounds += [option for group in ALONE for option in choices(group)]
    found = [("train", tuple(overrides), compose_config(overrides)) for overrides in rounds]
    metrics = [("evaluate", tuple(option), compose_config(option, name="evaluate")) for option in choices("metrics")]
    return found + metrics


@functools.cache
def reachable() -> dict[str, tuple[object, int, str]]:
    """canonical target name -> (the callable, the index in compositions() of a config holding it, its path)."""
    targets = {}

    def walk(node, path, index, config):
        if isinstance(node, dict):
            target = node.get("_target_", BUILT_BY_CODE.get(path) if config == "train" else None)
            if isinstance(target, str) and "${" not in target:
                resolved = pkgutil.resolve_name(target)
                targets.setdefault(target_name(resolved), (resolved, index, path))
            for key, child in node.items():
                if key not in HYDRA_KEYS:
                    walk(child, f"{path}.{key}", index, config)
        elif isinstance(node, list):
            for position, child in enumerate(node):
                walk(child, f"{path}.{position}", index, config)

    for index, (config, _, cfg) in enumerate(compositions()):
        tree = OmegaConf.to_container(cfg, resolve=False)
        for key, node in tree.items():
            if key != "hydra":
                walk(node, key, index, config)
    return targets


def numeric_arguments(target) -> list[str]:
    """The arguments of `target` that take a number (or numbers): by annotation or by default."""
    names = []
    for parameter in inspect.signature(target).parameters.values():
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            continue
        annotation = parameter.annotation if isinstance(parameter.annotation, str) else repr(parameter.annotation)
        default = parameter.default
        defaults = default if isinstance(default, (list, tuple)) else [default]
        numeric_default = any(isinstance(d, (int, float)) and not isinstance(d, bool) for d in defaults)
        if parameter.annotation is not parameter.empty and NUMERIC_ANNOTATION.search(annotation) or numeric_default:
            names.append(parameter.name)
    return names


def numeric_keys() -> list[tuple[int, str, str]]:
    """(index of its composition, target name, config key) of every numeric argument of every reachable target."""
    return [(index, name, f"{path}.{argument}")
            for name, (target, index, path) in sorted(reachable().items())
            for argument in numeric_arguments(target)]


def test_every_numeric_argument_has_a_declared_range():
    keys = numeric_keys()
    missing = [f"{key} ({name})" for _, name, key in keys if key.rpartition(".")[2] not in RANGES.get(name, {})]
    assert not missing, f"numeric arguments without a range in ldm/checks/ranges.py: {missing}"
    per_group = Counter(key.split(".")[0] for _, _, key in keys)
    print(f"\n{len(keys)} numeric keys of {len({name for _, name, _ in keys})} targets have a range: "
          + ", ".join(f"{group} {count}" for group, count in sorted(per_group.items())))
    assert len(keys) > 150


def test_every_declared_range_names_an_argument():
    stale = [f"{name}.{argument}" for name, rules in RANGES.items() for argument in rules
             if argument not in inspect.signature(pkgutil.resolve_name(name)).parameters]
    assert not stale, f"ranges for arguments that do not exist: {stale}"


def out_of_range(rule) -> list[object]:
    """Values the rule refuses: below its minimum or above its maximum, and NaN where floats are allowed."""
    if isinstance(rule, OneOf):
        return ["17-mixed"]
    if isinstance(rule, Duration):
        return [{"hours": -1}]
    if isinstance(rule, Devices):
        return ["many"]
    if isinstance(rule, StepsOrFraction):
        return out_of_range(rule.steps)[:1] + out_of_range(rule.fraction)
    step = 1 if rule.whole else 0.5
    if rule.minimum is not None:
        bad = rule.minimum if rule.minimum_open else rule.minimum - step
    elif rule.maximum is not None:
        bad = rule.maximum if rule.maximum_open else rule.maximum + step
    else:
        bad = "many" if rule.whole else math.inf
    return [bad] if rule.whole else [bad, math.nan]



def problems(config: str, cfg) -> list[str]:
    """What the command's own config check says: train.py's, or evaluate.py's (conf/metrics is its group)."""
    if config == "evaluate":
        return evaluation_problems(cfg)
    try:
        check_training(cfg)
    except ConfigError as error:
        return error.errors
    return []


def test_every_numeric_key_refuses_an_out_of_range_value(no_model):
    """All keys of one composed config get a bad value at once (each is reported on its own line); the values
    of each key are tried in turns."""
    cases = {}
    for index, name, key in numeric_keys():
        for turn, bad in enumerate(out_of_range(RANGES[name][key.rpartition(".")[2]])):
            cases.setdefault((index, turn), []).append((key, bad))
    slipped = []
    for (index, _), keys in cases.items():
        config, _, composed = compositions()[index]
        cfg = composed.copy()
        with open_dict(cfg):
            for key, bad in keys:
                OmegaConf.update(cfg, key, bad, force_add=True)
        errors = problems(config, cfg)
        slipped += [f"{key}={bad}" for key, bad in keys if not any(line.startswith(f"{key}=") for line in errors)]
    count = sum(map(len, cases.values()))
    print(f"\n{count} out-of-range values on {len(numeric_keys())} keys refused, in {len(cases)} checks")
    assert not slipped, f"accepted by the config check: {slipped}"


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_a_number_check_refuses_what_is_not_finite(value):
    from ldm.checks.findings import Findings

    found = Findings(OmegaConf.create({"guidance": value}))
    assert found.number("guidance", minimum=0) is not None and found.problems == [
        f"guidance={value} is not a finite number"]
