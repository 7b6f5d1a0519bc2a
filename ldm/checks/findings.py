"""What every config check shares: `Findings` collects one message per mistake while reading values."""

from __future__ import annotations

import math
import re
from typing import Any

from omegaconf import DictConfig, OmegaConf

UNKNOWN = object()  # a value that could not be resolved (its problem is already recorded)


class Findings:
    """Reads values of a config and collects the problems found in them."""

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self.problems: list[str] = []
        self.wrong: set[str] = set()  # keys already reported: later checks read them as UNKNOWN

    def add(self, problem: str, key: str | None = None) -> None:
        """Record `problem`; with `key`, that key's value is wrong and no further check reports it again."""
        if key is not None:
            self.wrong.add(key)
        if problem not in self.problems:
            self.problems.append(problem)

    def has(self, key: str) -> bool:
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(self.cfg, parent, default=None, throw_on_resolution_failure=False) if parent \
            else self.cfg
        return isinstance(node, DictConfig) and leaf in node

    def is_interpolation(self, key: str) -> bool:
        parent, _, leaf = key.rpartition(".")
        node = self.node(parent) if parent else self.cfg
        return OmegaConf.is_config(node) and OmegaConf.is_interpolation(node, leaf)

    def node(self, key: str) -> Any:
        """The config node at `key` as it is (interpolations unresolved); None when absent."""
        return OmegaConf.select(self.cfg, key, default=None, throw_on_resolution_failure=False)

    def value(self, key: str, default: Any = None) -> Any:
        """The resolved value at `key` (`default` when absent); UNKNOWN, with a problem recorded, when it fails
        or was found wrong already."""
        if key in self.wrong:
            return UNKNOWN
        try:
            value = OmegaConf.select(self.cfg, key, default=default)
        except Exception as error:  # a resolver's own message says what is wrong (e.g. an indivisible size)
            self.add(f"{key}: {interpolation_message(error)}", key=key)
            return UNKNOWN
        return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value

    def integer(self, key: str, minimum: int | None = None, hint: str = "", allow_none: bool = False) -> Any:
        """The value at `key` if it is an int of at least `minimum`; otherwise a problem and UNKNOWN."""
        value = self.value(key)
        if value is UNKNOWN or (value is None and allow_none):
            return value
        if not is_int(value):
            self.add(f"{key}={value!r} is not a whole number{hint_text(hint)}", key=key)
            return UNKNOWN
        if minimum is not None and value < minimum:
            self.add(f"{key}={value} must be at least {minimum}{hint_text(hint)}", key=key)
            return UNKNOWN
        return value

    def number(self, key: str, minimum: float | None = None, maximum: float | None = None, positive: bool = False,
               hint: str = "", allow_none: bool = False) -> Any:
        """The value at `key` if it is a finite number in range; otherwise a problem and UNKNOWN."""
        value = self.value(key)
        if value is UNKNOWN or (value is None and allow_none):
            return value
        if not is_number(value):
            self.add(f"{key}={value!r} is not a number{hint_text(hint)}", key=key)
            return UNKNOWN
        if not math.isfinite(value):  # NaN passes every comparison below, and no setting takes inf
            self.add(f"{key}={value} is not a finite number{hint_text(hint)}", key=key)
        elif positive and not value > 0:
            self.add(f"{key}={value} must be greater than 0{hint_text(hint)}", key=key)
        elif minimum is not None and value < minimum or maximum is not None and value > maximum:
            if minimum is not None and maximum is not None:
                bounds = f"in [{minimum}, {maximum}]"
            else:
                bounds = f"at least {minimum}" if minimum is not None else f"at most {maximum}"
            self.add(f"{key}={value} must be {bounds}{hint_text(hint)}", key=key)
        else:
            return value
        return UNKNOWN


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def show(value: Any) -> str:
    """A value as it is written on the command line."""
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def hint_text(hint: str) -> str:
    return f": {hint}" if hint else ""


def interpolation_message(error: Exception) -> str:
    first = str(error).splitlines()[0] if str(error) else type(error).__name__
    return re.sub(r"^\w+ raised while resolving interpolation: ", "", first)
