"""The `guidance` group checked before anything is built: its interval against the run's schedule, and the
weaker model or classifier run it names against the run. Runs are read as plain YAML; only the run's schedule
(no network) is built, once its targets pass the allow-list, to know its noise levels. Each key's range is in
ranges.py; whether the loaded weights fit (autoencoder hash, measured latent scale) is checked after loading,
before sampling (ldm.run.guidance)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from ldm.checks.data import condition_facts
from ldm.checks.findings import UNKNOWN, Findings, is_number
from ldm.checks.run_dir import CONFIG_FILE
from ldm.guidance import KINDS, NoiseInterval, noise_level
from ldm.run.trust import check_run_config
from ldm.utils.errors import UserError

# schedule keys that only shape training (which t are drawn, how the loss is weighted): free to differ
TRAINING_ONLY = ("time_sampler", "loss_weight")
# data keys that only shape loading
LOADING = ("batch_size", "val_batch_size", "global_batch_size", "num_workers", "cache", "cache_dir")
CHECKPOINTS = ("last", "best")


def guidance_problems(found: Findings, run_cfg: DictConfig | None, own_run: str | None = None,
                      checkpoint: str | None = None) -> None:
    """`run_cfg`: the config of the run that samples (None when unknown); `own_run` its directory (None for a
    preset or a run in training); `checkpoint` the one it samples with."""
    if not OmegaConf.is_dict(found.node("guidance")):
        return
    target = found.value("guidance._target_")
    kind = next((name for name, spec in KINDS.items() if target in (f"ldm.guidance.{spec.__name__}",
                                                                     f"{spec.__module__}.{spec.__qualname__}")), None)
    if kind is None:
        found.add(f"guidance._target_={target}: not a kind of guidance; choose guidance=cfg, auto or classifier")
        return
    interval_problems(found, run_cfg)
    if kind == "auto":
        weak_problems(found, run_cfg, own_run, checkpoint)
    if kind == "classifier":
        classifier_problems(found, run_cfg)


def interval_problems(found: Findings, run_cfg: DictConfig | None) -> None:
    given = [key for key in ("guidance.interval", "guidance.interval_t") if found.value(key) is not None]
    if len(given) == 2:
        found.add(f"guidance.interval={found.value(given[0])} and guidance.interval_t={found.value(given[1])}: give "
                  "one, in noise level sigma/alpha (interval) or in t (interval_t)")
        return
    for key, unit in (("guidance.interval", "sigma"), ("guidance.interval_t", "t")):
        value = found.value(key)
        if value is None or value is UNKNOWN:
            continue
        example = "[0.3,5.0]" if unit == "sigma" else "[0.1,0.9]"
        if not (isinstance(value, list) and len(value) == 2 and all(map(is_number, value)) and value[0] < value[1]):
            found.add(f"{key}={value}: give [{unit}_lo, {unit}_hi] with {unit}_lo < {unit}_hi, e.g. {key}={example}, "
                      "or null (guide at every step)", key=key)
        elif unit == "t" and not 0 <= value[0] < value[1] <= 1:
            found.add(f"{key}={value}: times are in [0, 1]; give 0 <= t_lo < t_hi <= 1, e.g. {key}={example}", key=key)
        elif (problem := unvisited(value, unit == "t", run_cfg, sampler_steps(found, run_cfg))) is not None:
            found.add(f"{key}={value}: {problem}; nothing would be guided", key=key)


def sampler_steps(found: Findings, run_cfg: DictConfig | None) -> Any:
    steps = found.value("steps")
    return steps if steps not in (None, UNKNOWN) else Findings(run_cfg).value("diffusion.sample_steps", 25) \
        if run_cfg is not None else None


def unvisited(interval: list, in_t: bool, run_cfg: DictConfig | None, steps: Any) -> str | None:
    """Why no step of the sampler's grid falls in the interval (None when one does, or when unknown)."""
    schedule = run_schedule(run_cfg)
    if schedule is None or not isinstance(steps, int) or steps < 1:
        return None
    try:
        times = schedule.timesteps(steps)[:-1]  # where the network is called (heun's extra calls are among them)
    except ValueError:  # too many steps for a discrete schedule: its own check says so
        return None
    inside = NoiseInterval(*map(float, interval), in_t=in_t).inside(schedule, times)
    if inside.any():
        return None
    if in_t:
        return f"none of the {steps} sampler steps' times ({times.min():.3g} to {times.max():.3g}) is in it"
    levels = noise_level(schedule, times)
    return (f"none of the {steps} sampler steps' noise levels sigma/alpha ({levels.min():.3g} to "
            f"{levels.max():.4g}) is in ({interval[0]:g}, {interval[1]:g}]")


def run_schedule(run_cfg: DictConfig | None):
    """The run's schedule (no network), built once its targets pass the allow-list; None when it cannot be."""
    if run_cfg is None or not OmegaConf.is_dict(run_cfg.get("schedule")):
        return None
    try:
        check_run_config(run_cfg.schedule, source="the run's schedule")
        return hydra.utils.instantiate(run_cfg.schedule)
    except (UserError, Exception):  # an untrusted or broken schedule: loading the run reports it in its own words
        return None


def weak_problems(found: Findings, run_cfg: DictConfig | None, own_run: str | None, checkpoint: str | None) -> None:
    weak_run, weak_checkpoint = found.value("guidance.weak_run"), found.value("guidance.weak_checkpoint")
    if weak_checkpoint not in (*CHECKPOINTS, UNKNOWN) and not Path(str(weak_checkpoint)).expanduser().is_file():
        found.add(f"guidance.weak_checkpoint={weak_checkpoint}: no such file; use last, best, or the path of a "
                  "checkpoint file (an earlier step of the weaker run)")
    if weak_run is None and own_run is None:
        found.add("guidance=auto needs the weaker model's run: give guidance.weak_run=DIR (a smaller or "
                  "shorter-trained run of the same data, autoencoder and schedule)")
        return
    same_run = weak_run is None or same_path(weak_run, own_run)
    if same_run and own_run is not None and same_checkpoint(own_run, weak_checkpoint, checkpoint):
        found.add(f"guidance=auto: guidance.weak_checkpoint={weak_checkpoint} is the checkpoint the run samples with "
                  f"(checkpoint={checkpoint}), and a model guided by itself is unguided; give an earlier checkpoint "
                  "of the run (guidance.weak_checkpoint=FILE) or a weaker run (guidance.weak_run=DIR)")
        return
    if weak_run is None or weak_run is UNKNOWN:
        return
    weak_cfg = other_run_config(found, "guidance.weak_run", weak_run, "diffusion")
    if weak_cfg is None or run_cfg is None:
        return
    fit_problems(found, "guidance.weak_run", weak_run, run_cfg, weak_cfg, ("autoencoder", "data.image_size"))
    ours, theirs = condition_facts(run_cfg), condition_facts(weak_cfg)
    if ours != theirs:
        found.add(f"guidance.weak_run={weak_run}: its model reads the conditions {sorted(theirs[0])} with "
                  f"{theirs[1]} classes, this run's {sorted(ours[0])} with {ours[1]}: the weaker model must take "
                  "the same conditions")


def classifier_problems(found: Findings, run_cfg: DictConfig | None) -> None:
    if OmegaConf.is_missing(found.node("guidance"), "classifier_run") or found.value("guidance.classifier_run") is None:
        found.add("guidance=classifier needs guidance.classifier_run=DIR: the directory of a python train.py "
                  "task=classifier run of this run's data, autoencoder and schedule")
        return
    classifier_run, checkpoint = found.value("guidance.classifier_run"), found.value("guidance.classifier_checkpoint")
    if checkpoint not in (*CHECKPOINTS, UNKNOWN) and not Path(str(checkpoint)).expanduser().is_file():
        found.add(f"guidance.classifier_checkpoint={checkpoint}: no such file; use last, best, or the path of a "
                  "checkpoint file")
    keys, _ = condition_facts(run_cfg)
    if keys is not None and "label" not in keys:
        found.add(f"guidance=classifier steers towards class labels, but the run's conditioner reads "
                  f"{sorted(keys) or 'nothing'}; use guidance=cfg or guidance=auto")
    classifier_cfg = other_run_config(found, "guidance.classifier_run", classifier_run, "classifier")
    if classifier_cfg is None or run_cfg is None:
        return
    fit_problems(found, "guidance.classifier_run", classifier_run, run_cfg, classifier_cfg, ("data", "autoencoder"))


def other_run_config(found: Findings, key: str, run: Any, task: str) -> DictConfig | None:
    """The config of the run directory `key` names, if it is a run of `task`; else a problem and None."""
    path = Path(str(run)).expanduser() / CONFIG_FILE
    if not path.is_file():
        found.add(f"{key}={run}: {path} not found: give a training run directory (it holds {CONFIG_FILE})")
        return None
    try:
        cfg = OmegaConf.load(path)
    except Exception as error:
        found.add(f"{key}={run}: {path} cannot be read ({error})")
        return None
    made = cfg.get("task", "diffusion")
    if made != task:
        what = "the weaker diffusion model" if task == "diffusion" else "a python train.py task=classifier run"
        found.add(f"{key}={run} is a task={made} run; give {what}")
        return None
    return cfg


def fit_problems(found: Findings, key: str, run: Any, run_cfg: DictConfig, other_cfg: DictConfig,
                 groups: tuple[str, ...]) -> None:
    """One line for the first setting of `groups` and of the parameterization in which the two runs differ."""
    for group in (*groups, "schedule"):
        ours, theirs = settings(run_cfg, group), settings(other_cfg, group)
        if ours is None or theirs is None or ours == theirs:
            continue
        name, mine, its = first_difference(group, ours, theirs)
        what = {"data": "another data set", "schedule": "another parameterization (both must read the same x_t "
                                                                  "and t)"}.get(group, "other latents")
        found.add(f"{key}={run} was trained with {name}={its}, this run with {name}={mine}: {what}; use a run made "
                  f"with this run's {group.split('.')[0]} settings")
        return


def settings(cfg: DictConfig, group: str) -> Any:
    """A group's resolved settings, less those that only shape training or loading; None when unresolvable."""
    value = Findings(cfg).value(group)
    if value is UNKNOWN:
        return None
    if isinstance(value, dict):
        skip = TRAINING_ONLY if group == "schedule" else LOADING if group == "data" else ()
        value = {k: v for k, v in value.items() if k not in skip}
    return value


def first_difference(prefix: str, ours: Any, theirs: Any) -> tuple[str, Any, Any]:
    if isinstance(ours, dict) and isinstance(theirs, dict):
        for name in sorted(set(ours) | set(theirs), key=str):
            if ours.get(name) != theirs.get(name):
                return first_difference(f"{prefix}.{name}", ours.get(name), theirs.get(name))
    return prefix, ours, theirs


def same_path(one: Any, other: Any) -> bool:
    return other is not None and Path(str(one)).expanduser().resolve() == Path(str(other)).expanduser().resolve()


def same_checkpoint(run: str, weak: Any, strong: Any) -> bool:
    """Whether two checkpoint arguments of one run name the same file (`last` and `best` by name)."""
    if weak == strong:
        return True
    folder = Path(str(run)).expanduser() / "checkpoints"
    paths = [folder / "last.ckpt" if value == "last" else None if value == "best" else Path(str(value)).expanduser()
             for value in (weak, strong)]
    return None not in paths and paths[0].exists() and paths[1].exists() and paths[0].resolve() == paths[1].resolve()
