"""What a logger needs from the machine before a run starts: wandb's mode, and an account when it logs online.

wandb reads `WANDB_MODE` and its credentials only when the run's first value is logged: a mode it does not
know then ends in a validation traceback, and online mode without a key in a login prompt (or, with no
terminal, an error) after the run directory was made.
"""

from __future__ import annotations

import os
import re

from omegaconf import OmegaConf

from ldm.checks.findings import UNKNOWN, Findings, show

WANDB_LOGGER = "ldm.run.loggers.wandb_logger"
# wandb's modes (its Settings.mode); the project's default is offline (ldm.commands.train)
WANDB_MODES = ("online", "offline", "disabled", "shared", "dryrun", "run")
ONLINE_MODES = ("online", "shared", "run")


def wandb_problems(found: Findings, mode: str | None = None) -> None:
    """With a wandb logger: WANDB_MODE is one wandb knows, and online mode has credentials to log in with."""
    loggers = found.node("logger")
    names = [name for name in (loggers.keys() if OmegaConf.is_dict(loggers) else [])
             if found.value(f"logger.{name}._target_") == WANDB_LOGGER]
    if not names:
        return
    mode = mode if mode is not None else os.environ.get("WANDB_MODE", "offline")
    if mode not in WANDB_MODES:
        found.add(f"WANDB_MODE={mode} is not a wandb mode: use offline (the default; `wandb sync` later), online or "
                  "disabled")
        return
    for name in names:  # what wandb.init would refuse, by wandb's own rules
        tags = found.value(f"logger.{name}.tags")
        if isinstance(tags, str):
            found.add(f"logger.{name}.tags={tags} is one string, not a list (each letter would be a tag): write "
                      f"logger.{name}.tags=[{tags}]", key=f"logger.{name}.tags")
        for key, setting in (("project", "project"), ("tags", "run_tags")):
            value = found.value(f"logger.{name}.{key}")
            if value is not None and value is not UNKNOWN and (problem := wandb_setting_problem(setting, value)):
                found.add(f"logger.{name}.{key}={show(value)}: {problem}", key=f"logger.{name}.{key}")
    if mode in ONLINE_MODES and (problem := wandb_login_problem()):
        found.add(f"WANDB_MODE={mode} with logger=wandb: {problem}; or train offline (unset WANDB_MODE, "
                  "`wandb sync` the run later), or use logger=csv")


def wandb_setting_problem(setting: str, value) -> str | None:
    """What wandb says of `value` for its setting (a project name with a '/', a tag over 64 characters), else None."""
    import wandb  # deferred: a second to import, for runs that log to wandb only

    try:
        wandb.Settings(**{setting: tuple(value) if setting == "run_tags" and isinstance(value, list) else value})
    except Exception as error:  # noqa: BLE001 - wandb's UsageError, or pydantic's ValidationError
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        reason = next((line for line in lines if line.startswith("Value error, ")), lines[0] if lines else "")
        return "wandb refuses it: " + re.sub(r"^Value error, | \[type=.*$", "", reason)
    return None


def wandb_login_problem() -> str | None:
    """Why wandb could not log in without asking (no key, or a malformed one), else None."""
    import wandb  # deferred: a second to import, for runs that log to wandb only
    from wandb.errors import AuthenticationError  # deferred: with wandb
    from wandb.sdk.lib import wbauth  # deferred: with wandb

    try:
        host = wandb.Settings().base_url
    except Exception as error:  # noqa: BLE001 - pydantic's validation of WANDB_* variables
        return f"wandb refuses its settings from the environment ({str(error).splitlines()[0]})"
    try:
        found = wbauth.authenticate_session(host=host, source="ldm", prompt=False, update_session=False)
    except AuthenticationError as error:
        return f"wandb refuses the credentials ({error})"
    if found is None:
        return f"no wandb API key for {host}: run `wandb login`, or set WANDB_API_KEY"
    return None
