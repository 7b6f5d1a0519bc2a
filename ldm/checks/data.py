"""Config checks that need facts about the data: its folder, its item keys, its classes, its channels.

The facts are cheap: a data set class's declared `num_classes` and `item_keys`, or else its first
item's metadata (no image decoded); a weight file's header. No model is built.
"""

from __future__ import annotations

import inspect
import json
import pkgutil
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf
from safetensors import safe_open

from ldm.autoencoders.kl import resolve_weights
from ldm.checks.findings import UNKNOWN, Findings, is_int, show
from ldm.utils.errors import problem_lines, user_error_cause

# what to suggest when the data lacks the key a conditioner reads
CONDITIONERS_FOR = {"label": "conditioner=class", "caption": "conditioner=clip_text_tiny"}


def data_problems(found: Findings, conditioned: bool = True) -> None:
    if not root_problems(found):
        return
    autoencoder_problems(found)
    facts = DataFacts.of(found)
    if facts is None:
        return
    if not split_size_problems(found, facts):
        return
    class_problems(found, facts)
    if conditioned:
        conditioner_problems(found, facts)


def root_problems(found: Findings) -> bool:
    """A data set read from a folder needs an existing one; False when the data cannot be probed."""
    if not found.has("data.root"):
        return True
    root = found.value("data.root")
    if root is UNKNOWN:
        return False
    if root is None:
        found.add("root=null: this data set reads images from a folder; add root=DIR (or data.root=DIR)")
        return False
    if not Path(str(root)).expanduser().is_dir():
        found.add(f"root={root}: no such directory; give the folder that holds the images (root=DIR)")
        return False
    return True


class DataFacts:
    """What the training items carry (`keys`), how many classes their labels have (`num_classes`), and how many
    training items there are (`size`, where the data set was read to find its keys)."""

    def __init__(self, name: str, keys: frozenset[str], num_classes: int | None, size: int | None = None):
        self.name, self.keys, self.num_classes, self.size = name, keys, num_classes, size

    @classmethod
    def of(cls, found: Findings) -> DataFacts | None:
        target = found.value("data.train._target_")
        if not isinstance(target, str):
            return None
        try:
            dataset_class = pkgutil.resolve_name(target)
        except Exception:  # the key check reports a target that cannot be imported
            return None
        num_classes = getattr(dataset_class, "num_classes", None)
        name = target.rsplit(".", 1)[-1]
        keys = getattr(dataset_class, "item_keys", None)
        if keys is not None:
            return cls(name, frozenset(keys), num_classes)
        dataset = read_dataset(found, "data.train")
        if dataset is None:
            return None
        keys = frozenset(dataset.metadata(0)) | {"image"} if len(dataset) else frozenset({"image"})
        return cls(name, keys, num_classes, size=len(dataset))


def read_dataset(found: Findings, key: str) -> Any:
    """The data set at `key`, built (it reads its folder or makes its items; no model); None after a problem."""
    try:
        return hydra.utils.instantiate(found.node(key))
    except Exception as error:  # what the data set says about its own input (a folder without captions ...)
        cause = user_error_cause(error)
        if cause is not None:  # it names the key and the value itself
            for line in problem_lines(cause):
                found.add(line)
        else:
            found.add(f"{key} ({found.value(f'{key}._target_')}) cannot be read: {error.__cause__ or error}")
        return None


def split_size_problems(found: Findings, facts: DataFacts) -> bool:
    """At least one optimizer step of training items: checked before work, where the data set was read (a
    folder of images); False when there are none at all."""
    if facts.size is None:
        return True
    batch = found.value("data.batch_size")
    accumulate = found.value("trainer.accumulate_grad_batches", 1)
    devices, nodes = found.value("trainer.devices", 1), found.value("trainer.num_nodes", 1)
    world = devices * nodes if is_int(devices) and devices > 0 and is_int(nodes) else 1
    fraction = found.value("data.val_fraction")
    if facts.size == 0:
        validation = read_dataset(found, "data.val") if fraction is not None else None
        if validation is not None:
            found.add(f"data.val_fraction={fraction} leaves no training images: all {len(validation)} images of "
                      f"root={found.value('data.root')} go to validation; use a small share, e.g. "
                      "data.val_fraction=0.05", key="data.val_fraction")
        else:
            found.add(f"data.train ({facts.name}) has no training items", key="data.train")
        return False
    if not (is_int(batch) and is_int(accumulate) and batch > 0 and accumulate > 0):
        return True
    needed = batch * accumulate * world
    if facts.size < needed:
        per_step = [f"data.batch_size={batch}"]
        if accumulate > 1:
            per_step.append(f"trainer.accumulate_grad_batches={accumulate}")
        if world > 1:
            per_step.append(f"{world} devices")
        where = f" of root={found.value('data.root')}" if found.has("data.root") else ""
        split = f" (after data.val_fraction={fraction})" if fraction is not None else ""
        found.add(f"{' x '.join(per_step)} needs {needed} training images for one optimizer step, but there are "
                  f"{facts.size}{where}{split}: use data.batch_size={max(1, facts.size // (accumulate * world))} "
                  "or less", key="data.batch_size")
    return True


def class_problems(found: Findings, facts: DataFacts) -> None:
    """`data.num_classes` and each label embedder's `num_classes` against the labels the data has."""
    declared = found.value("data.num_classes")
    if facts.num_classes is not None and declared is not UNKNOWN and declared != facts.num_classes:
        found.add(f"data.num_classes={show(declared)} but {facts.name} has labels 0..{facts.num_classes - 1} "
                  f"({facts.num_classes} classes): use data.num_classes={facts.num_classes}")
    for index, reads in embedders(found):
        if reads != "label":
            continue
        key = f"conditioner.embedders.{index}.num_classes"
        if found.is_interpolation(key) and found.value(key) == declared:
            if facts.num_classes is not None:
                continue  # it follows data.num_classes, which is checked against the data above
            key = "data.num_classes"
        count = found.value(key)
        if count is UNKNOWN:  # already reported (out of range, or it does not resolve)
            continue
        if count is None:
            if "label" in facts.keys:
                found.add(f"{key}={show(count)}: a class embedder needs the number of classes; "
                          f"set data.num_classes={facts.num_classes or 'N'}")
        elif not is_int(count) or count < 1:
            found.add(f"{key}={count!r} must be a positive whole number of classes")
        elif facts.num_classes is not None and count < facts.num_classes:
            found.add(f"{key}={count} is fewer than the {facts.num_classes} classes of {facts.name} "
                      f"(labels 0..{facts.num_classes - 1}): use {facts.num_classes} (data.num_classes)")


def conditioner_problems(found: Findings, facts: DataFacts) -> None:
    """Each embedder reads a key of the batch: the data's items must carry it."""
    offered = sorted(facts.keys - {"image"})
    for index, key in embedders(found):
        if not isinstance(key, str) or key in facts.keys:
            continue
        fitting = sorted({CONDITIONERS_FOR[k] for k in offered if k in CONDITIONERS_FOR}) + ["conditioner=none"]
        found.add(f"conditioner.embedders.{index}.input_key={key}: the conditioner reads each item's '{key}', but "
                  f"{facts.name} items carry only {', '.join(offered) or 'the image'}: use "
                  f"{' or '.join(fitting)}, or data with a '{key}' (data=digits has labels, data=shapes captions)")


def embedders(found: Findings) -> list[tuple[int, str | None]]:
    """(index, the batch key it reads) for each embedder of the conditioner."""
    nodes = found.node("conditioner.embedders")
    if not OmegaConf.is_list(nodes):
        return []
    readers = []
    for index in range(len(nodes)):
        key = f"conditioner.embedders.{index}"
        if found.has(f"{key}.input_key"):
            readers.append((index, found.value(f"{key}.input_key")))
        else:
            readers.append((index, default_argument(found.value(f"{key}._target_"), "input_key")))
    return readers


def default_argument(target: Any, name: str) -> Any:
    """The default of argument `name` of the callable `target` names (None when it has none)."""
    try:
        parameter = inspect.signature(pkgutil.resolve_name(target)).parameters.get(name)
    except Exception:
        return None
    return None if parameter is None or parameter.default is inspect.Parameter.empty else parameter.default


def autoencoder_problems(found: Findings) -> None:
    """The autoencoder's input channels against the data's, and its settings against its weight file's."""
    channels = found.value("data.channels")
    in_channels = found.value("autoencoder.in_channels")
    weights = found.value("autoencoder.weights")
    own_format = found.value("autoencoder._target_") == "ldm.autoencoders.kl.KLAutoencoder"
    if isinstance(weights, str) and not own_format and not Path(weights).expanduser().exists():
        found.add(f"autoencoder.weights={weights} does not exist: give the pretrained autoencoder's weights "
                  "(a diffusers directory, a pipeline directory with vae/, or a weights file)")
    stored = weight_config(found, weights) if isinstance(weights, str) and own_format else None
    if stored:
        stored_in = stored.get("in_channels")
        if is_int(stored_in) and is_int(channels) and stored_in != channels:
            found.add(f"autoencoder.weights={weights} encodes {stored_in}-channel images, but data.channels="
                      f"{channels}: use an autoencoder made for {channels}-channel images (autoencoder=kl_shapes is "
                      "RGB, kl_digits gray; or autoencoder=kl autoencoder.weights=FILE), or train one with "
                      "task=autoencoder")
            return
        for key, value in stored.items():
            mine = found.value(f"autoencoder.{key}")
            if mine is not UNKNOWN and found.has(f"autoencoder.{key}") and mine != value:
                found.add(f"autoencoder.{key}={mine} does not fit autoencoder.weights={weights} (made with "
                          f"{key}={value}): use autoencoder.{key}={value}, or other weights")
        return
    if is_int(in_channels) and is_int(channels) and in_channels != channels:
        found.add(f"autoencoder.in_channels={in_channels} but data.channels={channels}: use an autoencoder for "
                  f"{channels}-channel images (autoencoder.in_channels={channels})")


def weight_config(found: Findings, weights: str) -> dict | None:
    """The settings stored in a weight file's header (None when it stores none)."""
    try:
        path = resolve_weights(weights)
    except OSError as error:  # no such file, or a directory
        found.add(f"autoencoder.weights={weights}: {error}")
        return None
    return _header_config(str(path))


def _header_config(path: str) -> dict | None:
    try:
        with safe_open(path, framework="np") as handle:
            metadata = handle.metadata() or {}
        return json.loads(metadata["config"]) if "config" in metadata else None
    except Exception:  # not a safetensors file: loading it reports that with its own message
        return None


def condition_facts(run_cfg: DictConfig | None) -> tuple[set[str] | None, int | None]:
    """The batch keys the run's conditioner reads, and its number of classes (None: unknown)."""
    if run_cfg is None:
        return None, None
    run = Findings(run_cfg)
    embedders = run.node("conditioner.embedders")
    embedders = OmegaConf.to_container(embedders, resolve=False) if OmegaConf.is_list(embedders) else []
    keys = {node.get("input_key", default_argument(node.get("_target_"), "input_key"))
            for node in embedders if isinstance(node, dict)}
    num_classes = run.value("data.num_classes")
    return keys, num_classes if is_int(num_classes) else None
