"""What a run directory's config may build: the project's own classes and a short list of library targets.

A run directory can come from anyone (a colleague, a download), and Hydra's `_target_` calls any
importable function with any arguments. So before a config from a run directory is resolved or
instantiated, every `_target_` in it is checked against the allow-list below, and interpolations
may use only resolvers that compute values (none that turn a string into new config nodes).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from types import ModuleType

import yaml
from hydra._internal.utils import _locate
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import GrammarParseError
from omegaconf.grammar.gen.OmegaConfGrammarParser import OmegaConfGrammarParser
from omegaconf.grammar_parser import parse

from ldm.run.renamed import with_current_targets
from ldm.utils.errors import UserError

PROJECT_PACKAGE = "ldm"

# library targets that conf/ configures, named exactly (a prefix would also admit what they import)
LIBRARY_TARGETS = frozenset({
    "torch.optim.AdamW",
    "lightning.pytorch.Trainer",
    "lightning.pytorch.callbacks.LearningRateMonitor",
    "lightning.pytorch.callbacks.ModelCheckpoint",
    "lightning.pytorch.loggers.TensorBoardLogger",
})

# the project's functions that configs name as targets; any other project target must be a class,
# so that helpers which delete or write files cannot be called from a config
PROJECT_FUNCTIONS = frozenset({
    "ldm.tasks.optim.constant",
    "ldm.tasks.optim.warmup_cosine",
    "ldm.run.loggers.wandb_logger",
    "ldm.callbacks.progress.progress_bar",
    "ldm.metrics.suite.build_suite",
})

# resolvers that only compute a value: the project's own (ldm.utils.config), OmegaConf's and Hydra's harmless
# ones. oc.create and oc.decode are left out on purpose: they turn a string into config nodes, which
# could hold a `_target_` that this check never saw
RESOLVERS = frozenset({"floordiv", "ldm_root", "loader_workers", "oc.env", "oc.select", "now", "hydra"})

# Hydra's positional arguments: no shipped config uses them, and a list of values is harder to check
REFUSED_KEYS = frozenset({"_args_"})


class UntrustedConfig(UserError, ValueError):
    """A run directory's config that names something outside the allow-list; nothing was built."""

    def __str__(self) -> str:
        return "\n".join(self.problems)


def load_run_config(path: str | Path, trusted: Iterable[str] = ()) -> DictConfig:
    """Load a run directory's config and check it (see `check_run_config`); nothing in it is resolved or built."""
    path = Path(path)
    try:
        cfg = OmegaConf.load(path)  # YAML's safe loader: no tags that build Python objects
    except (yaml.YAMLError, ValueError, OSError) as err:
        raise UserError(f"{path} cannot be read as a run config: {err}") from err
    if not isinstance(cfg, DictConfig):
        raise UserError(f"{path} holds a {type(cfg).__name__}, not a run config (a mapping of groups)")
    cfg = with_current_targets(cfg)
    check_run_config(cfg, source=path, trusted=trusted)
    return cfg


def check_run_config(cfg: DictConfig | ListConfig, source: str | Path, trusted: Iterable[str] = ()) -> None:
    """Raise UntrustedConfig naming every target, key and resolver in `cfg` that is not allowed.

    `trusted` adds exact target names the caller vouches for (its own parts outside `ldm`)."""
    trusted = frozenset(trusted)
    raw = OmegaConf.to_container(cfg, resolve=False)  # the strings as written, no resolver has run
    problems = [f"{source}: {problem}" for problem in _walk(raw, "", trusted)]
    if problems:
        problems.append(f"nothing was built from {source}. If you trust this run directory, pass the targets "
                        f"it needs, e.g. `+trusted_targets=[my_package.MyClass]` for sample.py")
        raise UntrustedConfig(problems)


def target_problem(target: object, trusted: frozenset[str] = frozenset()) -> str | None:
    """Why `target` may not be built from a run directory, or None when it may."""
    if not isinstance(target, str):
        return f"is a {type(target).__name__}, not a dotted name"
    if target in LIBRARY_TARGETS or target in trusted or target in PROJECT_FUNCTIONS:
        return None
    if "${" in target:
        return "is an interpolation; a run directory must name its targets literally"
    if target.split(".")[0] != PROJECT_PACKAGE:
        return (f"is not allowed: a run directory may build only the project's own classes ({PROJECT_PACKAGE}.*) "
                f"and {', '.join(sorted(LIBRARY_TARGETS))}")
    # the lookup that instantiate itself uses (get_object would log each failure as an error); from a
    # name that starts with `ldm.` it imports only the project's modules
    try:
        found = _locate(target)
    except Exception as err:  # noqa: BLE001 - any failure to look it up means it cannot be built either
        cause = err.__cause__ or err
        return f"cannot be found in the project ({type(cause).__name__}: {cause})"
    # `ldm.commands.sample.os.system` names a function that an `ldm` module merely imports
    if isinstance(found, ModuleType) or not isinstance(found, type):
        return (f"is not one of the project's classes (only these project functions may be targets: "
                f"{', '.join(sorted(PROJECT_FUNCTIONS))})")
    module = getattr(found, "__module__", "") or ""
    if module != PROJECT_PACKAGE and not module.startswith(PROJECT_PACKAGE + "."):
        return f"is {module}.{found.__qualname__}, which the project only imports; it is not one of its classes"
    return None


def _walk(node: object, path: str, trusted: frozenset[str]):
    if isinstance(node, dict):
        for key, value in node.items():
            where = f"{path}.{key}" if path else str(key)
            if key == "_target_":
                problem = target_problem(value, trusted)
                if problem:
                    yield f"{where}={value!r} {problem}"
            elif key in REFUSED_KEYS:
                yield f"{where} is refused: run directory configs pass arguments by name only"
            else:
                yield from _walk(value, where, trusted)
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _walk(value, f"{path}.{index}" if path else str(index), trusted)
    elif isinstance(node, str) and "${" in node:
        for problem in _resolver_problems(node):
            yield f"{path}={node!r}: {problem}"


def _resolver_problems(text: str) -> list[str]:
    try:
        tree = parse(text, parser_rule="configValue", lexer_mode="DEFAULT_MODE")
    except GrammarParseError as err:
        return [f"is not a valid interpolation ({err})"]
    problems, stack = [], [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, OmegaConfGrammarParser.InterpolationResolverContext):
            name = node.resolverName()
            if any(isinstance(part, OmegaConfGrammarParser.InterpolationContext) for part in name.getChildren()):
                problems.append(f"the resolver name {name.getText()!r} is computed; name resolvers literally")
            elif name.getText() not in RESOLVERS:
                problems.append(f"the resolver {name.getText()!r} is not allowed in a run directory's config "
                                f"(allowed: {', '.join(sorted(RESOLVERS))})")
        stack.extend(node.getChildren() if hasattr(node, "getChildren") else [])
    return problems
