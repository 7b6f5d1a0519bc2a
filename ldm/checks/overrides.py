"""Command-line overrides Hydra cannot apply, found before Hydra starts and reported as `error:` lines.

Hydra prints its own message for an override it cannot parse, a group option that does not exist or a key the
config does not have, and exits with status 1. They are the same kind of mistake as a value out of range, so
the entry points compose the config here first, as Hydra will, and report them like the others (exit 2). In a
sweep (-m) each value of each swept key is composed once, with the other swept keys at their first value.
Only Hydra and the config files are read: no torch, so this costs a fraction of a second.
"""

from __future__ import annotations

import difflib
import re

from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.errors import HydraException, MissingConfigException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ldm.utils.config import CONF

MULTIRUN = ("-m", "--multirun")
NOT_IN_STRUCT = re.compile(r"Could not override '([^']+)'")
ALREADY_THERE = re.compile(r"An item is already at '([^']+)'")
AMBIGUOUS = re.compile(r"Ambiguous value for argument '([^']+)'")


def override_problems(arguments: list[str], config_name: str) -> list[str]:
    """One line per override of `arguments` (a command line, without the script) that Hydra would refuse."""
    if not (CONF / f"{config_name}.yaml").is_file() or any(a.startswith("-") and a not in MULTIRUN for a in arguments):
        return []  # an installed package, or Hydra's own options (--help, --cfg, --config-dir ...): Hydra's business
    multirun = any(a in MULTIRUN for a in arguments)
    lines = [a for a in arguments if a not in MULTIRUN]
    parser = OverridesParser.create()
    parsed, problems = [], []
    for line in lines:
        try:
            parsed.append(parser.parse_override(line))
        except HydraException as error:  # the parser raises it, or OverrideParseException
            problems.append(f"{line}: Hydra cannot read this override ({first_line(error)}); write key=value, "
                            "group=option, +key=value (a key the config does not have), or key=a,b with -m (a sweep)")
    if problems:
        return problems
    jobs = sweep_variants(parsed) if multirun else [lines]
    if jobs is None:  # a sweep only its sweeper can expand (an interval for Optuna): Hydra reports those
        return []
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        for job in jobs:
            if problem := composition_problem(config_name, job):
                return [problem]
    return []


def sweep_variants(parsed: list[Override]) -> list[list[str]] | None:
    """Jobs of a sweep in which every value of every swept key occurs once (the others at their first value)."""
    try:
        values = {o.input_line: list(o.sweep_string_iterator()) for o in parsed if o.is_sweep_override()}
    except HydraException:
        return None
    base = {o.input_line: (f"{o.get_key_element()}={values[o.input_line][0]}" if o.input_line in values
                           else o.input_line) for o in parsed}
    jobs = [list(base.values())]
    for override in parsed:
        for value in values.get(override.input_line, [])[1:]:
            jobs.append([f"{override.get_key_element()}={value}" if line == override.input_line else job_line
                         for line, job_line in base.items()])
    return jobs


def composition_problem(config_name: str, job: list[str]) -> str | None:
    try:
        compose(config_name=config_name, overrides=job)
    except MissingConfigException as error:
        return missing_option(error, job)
    except (HydraException, OmegaConfBaseException) as error:
        return failed_override(error, config_name, job)
    return None


def missing_option(error: MissingConfigException, job: list[str]) -> str:
    """`model=ditt`: the group's options, the closest first."""
    group, _, option = str(error.missing_cfg_file or "").rpartition("/")
    options = list(error.options or [])
    if not group or not options:
        return first_line(error)
    closest = difflib.get_close_matches(option, options, n=1)
    suggestion = f"did you mean {group}={closest[0]}? " if closest else ""
    line = next((line for line in job if line.lstrip("+~").split("=")[0] == group), f"{group}={option}")
    return f"{line}: {group} has no option {option}; {suggestion}the options are {', '.join(options)}"


def failed_override(error: Exception, config_name: str, job: list[str]) -> str:
    """A key the config does not have (with the closest names it has), or Hydra's own first lines."""
    match = NOT_IN_STRUCT.search(str(error))
    cause = error.__cause__
    if match and cause is not None and "not in struct" in str(cause):
        key = match.group(1)
        line = next((line for line in job if line.split("=")[0] == key), key)
        parent, _, leaf = key.rpartition(".")
        others = [other for other in job if other != line]
        try:
            node = compose(config_name=config_name, overrides=others)
            node = OmegaConf.select(node, parent) if parent else node
            names = [str(name) for name in node.keys()] if OmegaConf.is_dict(node) else []
        except (HydraException, OmegaConfBaseException):
            names = []
        closest = difflib.get_close_matches(leaf, names, n=3)
        suggestion = f"did you mean {', '.join(f'{parent}.{c}' if parent else c for c in closest)}? " if closest \
            else ""
        return f"{line}: the config has no key {key}; {suggestion}to add a key it does not have, write +{line}"
    if present := ALREADY_THERE.search(str(error)):
        key = present.group(1)
        line = next((line for line in job if line.startswith(f"+{key}=")), f"+{key}")
        return f"{line}: the config has {key} already; to change it write {line[1:]}"
    if ambiguous := AMBIGUOUS.search(str(error)):
        return (f"{ambiguous.group(1)}: values with commas are a sweep, which needs -m (python {config_name}.py -m "
                "...); for a list write key=[a,b], for text with commas quote it: key='a,b'")
    cause_text = f" ({first_line(cause)})" if cause is not None and first_line(cause) not in str(error) else ""
    return f"{first_line(error)}{cause_text}"


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
