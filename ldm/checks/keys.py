"""Config keys checked against the constructors they are passed to, before anything is built.

Every node with a `_target_` is called by Hydra with its keys as keyword arguments; a key the target
does not take is a typo or a stale setting, and is reported with the closest names the target accepts.
"""

from __future__ import annotations

import difflib
import inspect
import pkgutil
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from ldm.utils.errors import ConfigError  # noqa: F401  (raised by check_config; imported from here by callers)

# Hydra's own keys, read by instantiate and never passed to the target
HYDRA_KEYS = frozenset({"_target_", "_partial_", "_recursive_", "_convert_", "_args_"})
# top-level nodes that are not instantiated as they are: Hydra's settings
SKIPPED_ROOTS = frozenset({"hydra"})


def accepted_keys(target: Callable) -> frozenset[str] | None:
    """The keyword arguments `target` takes; None when it takes any (`**kwargs`) or cannot be inspected."""
    try:
        parameters = _parameters(target)
    except (TypeError, ValueError):  # builtins and C extensions without a signature
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return None
    return frozenset(p.name for p in parameters
                     if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY))


def _parameters(target: Callable) -> list[inspect.Parameter]:
    # a metaclass's __call__(*args, **kwargs) would hide the arguments of the constructor it calls
    custom_call = inspect.isclass(target) and type(target).__call__ is not type.__call__
    if custom_call and target.__init__ is not object.__init__:
        return list(inspect.signature(target.__init__).parameters.values())[1:]
    return list(inspect.signature(target).parameters.values())


def check_keys(node: Mapping | DictConfig, target: Callable, path: str, passed_by_code: Iterable[str] = (),
               target_name: str | None = None) -> list[str]:
    """Messages for the keys of `node` (at config path `path`) that `target` does not accept.

    `passed_by_code`: arguments the code supplies itself (e.g. the denoiser for `diffusion`), so a
    config key of that name would collide with it and is reported too."""
    accepted = accepted_keys(target)
    if accepted is None:
        return []
    name = target_name or f"{getattr(target, '__module__', '?')}.{getattr(target, '__qualname__', target)}"
    reserved = set(passed_by_code)
    errors = []
    for key in map(str, node.keys()):
        if key in HYDRA_KEYS:
            continue
        if key in reserved:
            errors.append(f"{path}.{key}: set by the code for {name}, not by the config; remove it")
        elif key not in accepted:
            errors.append(f"{path}.{key}: unknown key for {name}; {_suggestion(key, accepted - reserved)}")
    return errors


def config_errors(cfg: DictConfig | Mapping, targets: Mapping[str, Callable] | None = None,
                  passed_by_code: Mapping[str, Iterable[str]] | None = None) -> list[str]:
    """Messages for every unknown key of every node with a `_target_` in the composed config (Hydra's own
    `hydra:` node aside): model, autoencoder, conditioner and its embedders, schedule, sampler, data and
    its datasets, trainer, each callback, each logger, and whatever nodes they nest.

    `targets` maps a config path without `_target_` to the callable the code passes it to (`diffusion`);
    `passed_by_code` maps a path to the arguments the code gives that callable itself."""
    # interpolations stay unresolved: only keys are checked, and some resolve only inside a Hydra run
    tree = OmegaConf.to_container(cfg, resolve=False) if isinstance(cfg, (DictConfig, ListConfig)) else cfg
    walk = _Walk(dict(targets or {}), {path: tuple(keys) for path, keys in (passed_by_code or {}).items()})
    for key, value in tree.items():
        if key not in SKIPPED_ROOTS:
            walk(value, str(key))
    return walk.errors


def check_config(cfg: DictConfig | Mapping, targets: Mapping[str, Callable] | None = None,
                 passed_by_code: Mapping[str, Iterable[str]] | None = None) -> None:
    """Raise one `ConfigError` listing every unknown key of the composed config (see `config_errors`)."""
    errors = config_errors(cfg, targets, passed_by_code)
    if errors:
        raise ConfigError(errors)


class _Walk:
    """Visits every node of a plain config tree, checking each node that names its callable."""

    def __init__(self, targets: dict[str, Callable], passed_by_code: dict[str, tuple[str, ...]]):
        self.targets, self.passed_by_code = targets, passed_by_code
        self.errors: list[str] = []

    def __call__(self, value: Any, path: str) -> None:
        if isinstance(value, Mapping):
            self.check(value, path)
            for key, child in value.items():
                if key not in HYDRA_KEYS:
                    self(child, f"{path}.{key}")
        elif isinstance(value, list):
            for index, child in enumerate(value):
                self(child, f"{path}.{index}")

    def check(self, node: Mapping, path: str) -> None:
        passed = self.passed_by_code.get(path, ())
        target = node.get("_target_")
        if target is None and path in self.targets:
            self.errors.extend(check_keys(node, self.targets[path], path, passed))
        # an interpolated or missing target is resolved later; its keys cannot be judged here
        elif isinstance(target, str) and target and "${" not in target and target != "???":
            try:
                target_callable = pkgutil.resolve_name(target)  # as Hydra locates it, without its logging
            except Exception as error:  # whatever the import raised, the config named the wrong thing
                self.errors.append(f"{path}._target_={target}: cannot be imported ({type(error).__name__}: {error})")
                return
            self.errors.extend(check_keys(node, target_callable, path, passed, target_name=target))


def _suggestion(key: str, accepted: Iterable[str]) -> str:
    accepted = sorted(accepted)
    close = difflib.get_close_matches(key, accepted, n=3, cutoff=0.6)
    if close:
        return "did you mean " + " or ".join(close) + "?"
    return "it takes " + (", ".join(accepted) if accepted else "no arguments")
