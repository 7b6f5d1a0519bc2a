"""Which layers of a denoiser a fine-tune adapts or trains: presets by name, or regular expressions of module names.

A target is a preset of the denoiser's class (`attention`, `mlp`, `adaln` for the DiT; `attention`, `mlp`,
`convs` for the UNet) or a regular expression matching a whole module name (as `named_modules` gives it) or its
last parts, as peft's `target_modules` list does: `to_qkv` picks every `...attn.to_qkv`, `blocks\\.[45]` the
DiT's last two blocks. A module is picked when it or a module holding it matches; for adapters only the layers
they can wrap (linear layers and 2-D convolutions) count.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence

from torch import nn

from ldm.utils.errors import ConfigError

LAYERS = (nn.Linear, nn.Conv2d)  # what peft's adapters wrap here
# per denoiser class: preset -> (regular expression of module names, the layer types it picks)
PRESETS: dict[str, dict[str, tuple[str, tuple[type, ...]]]] = {
    "DiT": {
        "attention": (r"blocks\.\d+\.(attn|cross_attn)\.(to_qkv|to_q|to_kv|to_out)", LAYERS),
        "mlp": (r"blocks\.\d+\.mlp\.net\.(0\.0|2)", LAYERS),
        "adaln": (r"(blocks\.\d+|final_layer)\.adaLN_modulation\.proj", LAYERS),
    },
    "UNet": {
        "attention": (r".*\.(attn|attn1|attn2)\.(to_qkv|to_q|to_kv|to_out)", LAYERS),
        "mlp": (r".*\.ff\.net\.(0\.proj|2)", LAYERS),
        "convs": (r"(down_stages|middle|up_stages)\..*", (nn.Conv2d,)),
    },
}
DEFAULT_TARGETS = {"DiT": ["attention", "mlp", "adaln"], "UNet": ["attention", "mlp"]}


def network_kind(network: nn.Module) -> str:
    return type(network).__name__


def default_targets(network: nn.Module) -> list[str]:
    return list(DEFAULT_TARGETS.get(network_kind(network), []))


def _pattern(target: str, network: nn.Module) -> tuple[re.Pattern, tuple[type, ...]]:
    presets = PRESETS.get(network_kind(network), {})
    if target in presets:
        expression, kinds = presets[target]
        return re.compile(expression), kinds
    try:
        return re.compile(target), (nn.Module,)
    except re.error as error:
        raise ConfigError([f"finetune.targets: {target!r} is not a regular expression ({error})"]) from None


def _held_by_match(name: str, pattern: re.Pattern) -> bool:
    """Whether `pattern` fully matches the name (or its last parts) of this module or of one that holds it."""
    parts = name.split(".")
    return any(pattern.fullmatch(".".join(parts[start:end]))
               for end in range(1, len(parts) + 1) for start in range(end))


def matched_modules(network: nn.Module, targets: Sequence[str] | None, leaves: tuple[type, ...] = ()
                    ) -> list[str]:
    """The names of the modules the targets pick (`leaves`: only modules of these types); one ConfigError listing
    every target that picks none, with the module names closest to it."""
    targets = list(targets) if targets else default_targets(network)
    if not targets:
        raise ConfigError([f"finetune.targets is empty and the {network_kind(network)} has no default targets: "
                           "give regular expressions of module names"])
    modules = [(name, module) for name, module in network.named_modules() if name]
    picked, problems = {}, []
    for target in targets:
        pattern, kinds = _pattern(str(target), network)
        found = [name for name, module in modules if _held_by_match(name, pattern) and isinstance(module, kinds)
                 and (not leaves or isinstance(module, leaves))]
        if not found:
            problems.append(no_match(str(target), network, leaves))
        picked.update(dict.fromkeys(found))
    if problems:
        raise ConfigError(problems)
    return list(picked)


def no_match(target: str, network: nn.Module, leaves: tuple[type, ...]) -> str:
    """One line: the target, that it matches nothing (of the layer types), and the closest module names."""
    names = [name for name, module in network.named_modules() if name and (not leaves or isinstance(module, leaves))]

    def closeness(name: str) -> float:  # against the name's last parts too: a target may name those alone
        parts = name.split(".")
        return max(difflib.SequenceMatcher(None, target, ".".join(parts[start:])).ratio()
                   for start in range(len(parts)))

    close = sorted(names, key=closeness, reverse=True)[:3]  # a stable sort: ties in the network's order
    kinds = f" that an adapter can wrap ({', '.join(kind.__name__ for kind in leaves)})" if leaves else ""
    presets = ", ".join(PRESETS.get(network_kind(network), {})) or "none"
    return (f"finetune.targets: {target!r} matches no module{kinds} of the {network_kind(network)}; the closest "
            f"module names are {', '.join(close)} (or a preset of the {network_kind(network)}: {presets})")
