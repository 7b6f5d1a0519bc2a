"""Published weights against the config that would run them, checked before anything is built.

A weight file's tensors fix the network's shapes, and its loader names the keys to set when they differ.
What the tensors do not fix would load silently into a network that computes something else: the time
a DDPM-family network was trained on (the integer level k), its time sinusoids and position embedding,
and, for a class-conditional DiT, the class table that only the conditioner loads. The readers in
`ldm/weights/` say what a file fixes (`conventions`, from its header and config.json); this check
compares it with the config and refuses a mismatch with one line naming every key to set.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from ldm.checks.findings import UNKNOWN, Findings, show
from ldm.weights import dit, unet
from ldm.weights.files import ABSENT, Conventions, WeightsError

# the denoisers whose model.weights a reader of ldm/weights loads
READERS = {"ldm.models.dit.DiT": dit.conventions, "ldm.models.unet.UNet": unet.conventions}
CLASS_EMBEDDER = "ldm.conditioners.class_embedder.ClassEmbedder"
# what a config without schedule.time_input should switch to, to give a network its integer level
LEVEL_SCHEDULE = "schedule=ddpm"


def published_weight_problems(found: Findings) -> None:
    """model.weights against the conventions of the network the file holds (one line per file)."""
    path = found.value("model.weights")
    reader = READERS.get(found.value("model._target_"))
    if not isinstance(path, str) or reader is None:
        return
    try:
        facts = reader(path)
    except WeightsError:  # a missing or unreadable file: building the model names it
        return
    for problem in facts.problems:
        found.add(f"model.weights={path}: {problem}")
    settings = setting_problems(found, facts)
    if facts.class_table is not None:
        settings += class_table_problems(found, path, facts.class_table)
    if settings:
        found.add(f"model.weights={path} is {facts.description}; this config would run it as another network: "
                  f"set {' '.join(settings)}")


def setting_problems(found: Findings, facts: Conventions) -> list[str]:
    """`key=value` for each setting of the config that differs from what the file fixes."""
    out = []
    for key, accepted in facts.settings.items():
        value = found.value(key) if found.has(key) else ABSENT
        if value is UNKNOWN or any(same_value(value, wanted) for wanted in accepted):
            continue
        if value is ABSENT:  # e.g. schedule.time_input of a schedule without integer levels (flow, edm)
            out.append(LEVEL_SCHEDULE)
        out.append(f"{key}={show(accepted[0])}")
    return out


def class_table_problems(found: Findings, path: str, table: tuple[int, int]) -> list[str]:
    """What to set so the conditioner embeds labels with the file's own class table."""
    rows = table[0]
    nodes = found.node("conditioner.embedders")
    indices = [index for index in range(len(nodes) if OmegaConf.is_list(nodes) else 0)
               if found.value(f"conditioner.embedders.{index}._target_") == CLASS_EMBEDDER]
    key = f"conditioner.embedders.{indices[0] if indices else 0}"
    loaded = found.value(f"{key}.weights") if indices else None
    if not (isinstance(loaded, str) and same_file(loaded, path)):  # no table, a random one, or another file's
        return ["conditioner=imagenet"] + ([f"{key}.num_classes={rows - 1}"] if rows != 1001 else [])
    # the table's width is the DiT's: a config of another width is refused by the loaders, naming the key
    return [f"{key}.num_classes={rows - 1}"] if found.value(f"{key}.num_classes") not in (rows - 1, UNKNOWN) else []


def same_value(value, wanted) -> bool:
    """Equal, where true and false are not the numbers 1 and 0."""
    return value is wanted if isinstance(value, bool) or isinstance(wanted, bool) else value == wanted


def same_file(first: str, second: str) -> bool:
    return Path(first).expanduser().resolve() == Path(second).expanduser().resolve()
