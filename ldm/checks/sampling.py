"""The arguments of `sample.py` checked before the run is rebuilt: ranges, types, and fit with the run.

The run's `.hydra/config.yaml` is read as plain YAML (nothing in it is built here) for the classes and
the condition keys the run was trained with.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ldm.checks.data import condition_facts
from ldm.checks.ema import ema_length_problems
from ldm.checks.findings import UNKNOWN, Findings, is_int
from ldm.checks.finetune import lora_source_problems, meta_denoiser
from ldm.checks.guidance import guidance_problems
from ldm.checks.ranges import SEED, check_value, range_problems
from ldm.checks.run_dir import CONFIG_FILE
from ldm.checks.weights import published_weight_problems
from ldm.conditioners.class_embedder import CLASS_NAMES, class_indices
from ldm.run.load import read_run_config
from ldm.run.presets import missing_values, preset_config
from ldm.utils.errors import ConfigError, UserError


def sampling_problems(cfg: DictConfig) -> list[str]:
    found = Findings(cfg)
    range_problems(found, built_by_code={})
    argument_problems(found, n_minimum=1, n_hint="the number of images to draw, e.g. n=100")
    run_problems(found, "sample.py")
    checkpoint_problems(found, ("last", "best"))
    post_hoc_ema_problems(found)
    if not found.problems:
        lora_source_problems(found, lambda: sampled_denoiser(found.cfg))
    out = found.value("out")
    if out is not None and not str(out).endswith(".npz"):
        found.add(f"out={out}: sample.py writes an .npz archive (and a .png grid beside it); give a name ending "
                  f"in .npz, e.g. out={Path(str(out)).with_suffix('.npz')}")
    return found.problems


def sampled_denoiser(cfg: DictConfig):
    """The denoiser of the run or preset sampled, on the meta device (None when it cannot be built)."""
    try:
        run_cfg = preset_config(cfg.preset, list(cfg.get("preset_overrides") or [])) if cfg.get("preset") \
            else read_run_config(cfg.run, cfg.get("trusted_targets") or ())
    except UserError:
        return None
    return meta_denoiser(run_cfg.model)


def argument_problems(found: Findings, n_minimum: int, n_hint: str) -> None:
    """The numbers sample.py and evaluate.py share."""
    found.integer("n", minimum=n_minimum, hint=n_hint)
    found.integer("batch_size", minimum=1, hint="images per forward pass, e.g. batch_size=250")
    if found.integer("seed", hint="e.g. seed=0") is not UNKNOWN:
        check_value(found, "seed", SEED)
    found.integer("steps", minimum=1, allow_none=True, hint="sampler steps, e.g. steps=25 (null: the run's own)")


def run_problems(found: Findings, script: str) -> None:
    """The run (or preset) exists, the labels or prompts asked for fit its conditions, and the guidance fits it."""
    run_cfg = run_config(found, script)
    keys, num_classes = condition_facts(run_cfg)
    label_problems(found, keys, num_classes, run_cfg)
    prompt_problems(found, keys)
    own_run = None if OmegaConf.is_missing(found.cfg, "run") else found.value("run")
    guidance_problems(found, run_cfg, None if own_run is UNKNOWN else own_run, found.value("checkpoint"))


def checkpoint_problems(found: Findings, names: tuple[str, ...]) -> None:
    checkpoint = found.value("checkpoint")
    if checkpoint not in (*names, UNKNOWN) and not Path(str(checkpoint)).expanduser().is_file():
        found.add(f"checkpoint={checkpoint}: no such file; use {', '.join(names)}, or the path of a checkpoint file"
                  + (" (init: untrained)" if "init" in names else ""))


def post_hoc_ema_problems(found: Findings) -> None:
    """`ema_length=`: the run's snapshots reconstruct it, and it replaces the last checkpoint's EMA weights."""
    if found.value("ema_length") is None:
        return
    checkpoint = found.value("checkpoint")
    if checkpoint not in ("last", UNKNOWN):
        found.add(f"ema_length= and checkpoint={checkpoint}: the post-hoc EMA is reconstructed from the run's "
                  "snapshots up to its last one; drop checkpoint= (or ema_length=, for that checkpoint's own EMA)")
    run = None if OmegaConf.is_missing(found.cfg, "run") else found.value("run")
    ema_length_problems(found, "ema_length", run)


def ema_problems(cfg: DictConfig) -> list[str]:
    """The arguments of `python -m ldm.ema`: a training run, and a length its snapshots reconstruct."""
    found = Findings(cfg)
    if run_config(found, "python -m ldm.ema") is not None:
        if OmegaConf.is_missing(cfg, "sigma_rel"):
            found.add("sigma_rel: missing; give the EMA length to reconstruct, e.g. sigma_rel=0.08")
        else:
            ema_length_problems(found, "sigma_rel", found.value("run"))
    return found.problems


def check_sampling(cfg: DictConfig) -> None:
    if problems := sampling_problems(cfg):
        raise ConfigError(problems)


def run_config(found: Findings, script: str = "sample.py") -> DictConfig | None:
    experiment = found.cfg.get("preset")
    run = None if OmegaConf.is_missing(found.cfg, "run") else found.value("run")
    if run is not None and experiment is not None:
        found.add(f"run={run} and preset={experiment}: give one, a training run directory or a preset")
        return None
    if run is None and experiment is not None:
        return preset_run_config(found, str(experiment))
    if run is None:
        found.add(f"run: missing; give the training run directory, e.g. {script} run=runs/2026-11-22/10-00-00, "
                  "or a preset with its weights: preset=EXPERIMENT preset_overrides=\"['model.weights=FILE']\"")
        return None
    path = Path(str(run)).expanduser() / CONFIG_FILE
    if not path.is_file():
        found.add(f"run={run}: {path} not found: run= must be a training run directory (it holds {CONFIG_FILE})")
        return None
    try:
        run_cfg = OmegaConf.load(path)
    except Exception as error:
        found.add(f"run={run}: {path} cannot be read ({error})")
        return None
    task = run_cfg.get("task", "diffusion")
    if task != "diffusion":
        found.add(f"run={run} is a task={task} run; sampling needs a diffusion run (task=diffusion)")
        return None
    return run_cfg


def preset_run_config(found: Findings, experiment: str) -> DictConfig | None:
    """The composed preset, or None with the problems added (an unknown preset, weights left to give)."""
    try:
        cfg = preset_config(experiment, list(found.cfg.get("preset_overrides") or []))
    except ConfigError as error:
        found.problems.extend(error.errors)
        return None
    for key in missing_values(cfg):
        found.add(f"preset={experiment} needs {key}: add it to preset_overrides, e.g. "
                  f"preset_overrides=\"['{key}=/path/to/weights']\"")
    if not found.problems:
        weights = Findings(cfg)
        published_weight_problems(weights)
        found.problems.extend(f"preset={experiment}: {line}" for line in weights.problems)
    return None if found.problems else cfg


def class_names_of(run_cfg: DictConfig | None) -> str | None:
    """The named class list (e.g. "imagenet") of the run's label embedder, for labels given by name."""
    embedders = Findings(run_cfg).node("conditioner.embedders") if run_cfg is not None else None
    embedders = OmegaConf.to_container(embedders, resolve=False) if OmegaConf.is_list(embedders) else []
    return next((node["class_names"] for node in embedders
                 if isinstance(node, dict) and isinstance(node.get("class_names"), str)), None)


def label_problems(found: Findings, keys: set[str] | None, num_classes: int | None,
                   run_cfg: DictConfig | None = None) -> None:
    labels = found.value("labels")
    if labels is None or labels is UNKNOWN:
        return
    if not isinstance(labels, list):
        found.add(f"labels={labels!r} is not a list: give a list of class labels, e.g. labels=[{labels}]")
        return
    if not labels:
        found.add("labels=[] is empty: give at least one class label, e.g. labels=[3], or labels=null")
    names = class_names_of(run_cfg)
    if names is not None and any(isinstance(label, str) for label in labels):
        try:
            labels = class_indices(labels, CLASS_NAMES[names]())
        except ValueError as error:
            found.add(f"labels: {error}")
            return
    wrong = [label for label in labels if not is_int(label)]
    if wrong:
        found.add(f"labels={labels}: {wrong[0]!r} is not a whole number; labels are class indices, e.g. "
                  "labels=[3,7] (or names, for runs with class_names)")
    elif num_classes is not None and any(not 0 <= label < num_classes for label in labels):
        outside = next(label for label in labels if not 0 <= label < num_classes)
        found.add(f"labels={labels}: {outside} is not a class of the run; it has classes 0..{num_classes - 1}")
    if keys is not None and "label" not in keys:
        found.add(f"labels={labels}: the run's conditioner reads no labels (it reads {sorted(keys) or 'nothing'}); "
                  "drop labels=")


def prompt_problems(found: Findings, keys: set[str] | None) -> None:
    prompts = found.value("prompts")
    if isinstance(prompts, str):
        found.add(f"prompts={prompts!r} is one string, not a list of prompts: write prompts='[\"{prompts}\"]'")
    elif prompts is not None and prompts is not UNKNOWN:
        if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
            found.add(f"prompts={prompts!r}: give a non-empty list of strings, e.g. prompts='[\"a red circle\"]'")
    prompts_file = found.value("prompts_file")
    if prompts_file is not None and prompts_file is not UNKNOWN and not Path(str(prompts_file)).is_file():
        found.add(f"prompts_file={prompts_file}: no such file; give a text file with one prompt per line")
    if (prompts or prompts_file) and keys is not None and "caption" not in keys:
        found.add(f"prompts: the run's conditioner reads no captions (it reads {sorted(keys) or 'nothing'}); "
                  "drop prompts= and prompts_file=")
