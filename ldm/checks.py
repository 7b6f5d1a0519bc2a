"""The composed training config checked before anything is built: types, ranges and cross-group consistency.

`check_training(cfg)` raises one `ConfigError` that lists every problem, one line each naming the key,
the value and what would be right. It reads only the config and cheap facts (a data set's declared
classes and item keys, a weight file's header); it never builds a model.
"""

from __future__ import annotations

import re
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ldm.errors import ConfigError
from ldm.validate import check_config

UNKNOWN = object()  # a value that could not be resolved (its problem is already recorded)


class Findings:
    """Reads values of a config and collects the problems found in them."""

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self.problems: list[str] = []

    def add(self, problem: str) -> None:
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
        """The resolved value at `key` (`default` when absent); UNKNOWN, with a problem recorded, when it fails."""
        try:
            value = OmegaConf.select(self.cfg, key, default=default)
        except Exception as error:  # a resolver's own message says what is wrong (e.g. an indivisible size)
            self.add(f"{key}: {interpolation_message(error)}")
            return UNKNOWN
        return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value

    def integer(self, key: str, minimum: int | None = None, hint: str = "", allow_none: bool = False) -> Any:
        """The value at `key` if it is an int of at least `minimum`; otherwise a problem and UNKNOWN."""
        value = self.value(key)
        if value is UNKNOWN or (value is None and allow_none):
            return value
        if not is_int(value):
            self.add(f"{key}={value!r} is not a whole number{hint_text(hint)}")
            return UNKNOWN
        if minimum is not None and value < minimum:
            self.add(f"{key}={value} must be at least {minimum}{hint_text(hint)}")
            return UNKNOWN
        return value

    def number(self, key: str, minimum: float | None = None, maximum: float | None = None, positive: bool = False,
               hint: str = "", allow_none: bool = False) -> Any:
        """The value at `key` if it is a number in range; otherwise a problem and UNKNOWN."""
        value = self.value(key)
        if value is UNKNOWN or (value is None and allow_none):
            return value
        if not is_number(value):
            self.add(f"{key}={value!r} is not a number{hint_text(hint)}")
            return UNKNOWN
        if positive and not value > 0:
            self.add(f"{key}={value} must be greater than 0{hint_text(hint)}")
        elif minimum is not None and value < minimum or maximum is not None and value > maximum:
            if minimum is not None and maximum is not None:
                bounds = f"in [{minimum}, {maximum}]"
            else:
                bounds = f"at least {minimum}" if minimum is not None else f"at most {maximum}"
            self.add(f"{key}={value} must be {bounds}{hint_text(hint)}")
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


def trainer_problems(found: Findings) -> None:
    fast_dev_run = found.value("trainer.fast_dev_run", False)
    max_steps = found.integer("trainer.max_steps", minimum=-1, hint="use a positive number of optimizer steps, "
                                                                    "or -1 (no limit) with trainer.max_time")
    if max_steps == 0 and not fast_dev_run:
        found.add("trainer.max_steps=0 trains nothing and leaves no checkpoint: use a positive number of steps, "
                  "e.g. trainer.max_steps=2500")
    interval = found.value("trainer.val_check_interval")
    if is_int(interval):
        if interval < 1:
            found.add(f"trainer.val_check_interval={interval} must be a positive number of steps, "
                      "e.g. trainer.val_check_interval=500")
        elif is_int(max_steps) and 0 < max_steps < interval and not fast_dev_run:
            found.add(f"trainer.val_check_interval={interval} is larger than trainer.max_steps={max_steps}: the run "
                      f"would never validate (no val/loss, no sample grid); use at most {max_steps}, "
                      f"e.g. trainer.val_check_interval={max_steps}")
    elif is_number(interval) and not 0 < interval <= 1:
        found.add(f"trainer.val_check_interval={interval}: a float is a fraction of an epoch and must be in (0, 1]; "
                  "give whole steps as an int, e.g. trainer.val_check_interval=500")


# Lightning strategies whose ranks train copies made by fork / spawn: the main process never sees their EMA
# or their last checkpoint, and would draw the final grid with the untrained weights it kept
SPAWNING_STRATEGIES = ("ddp_spawn", "ddp_fork", "ddp_notebook")
# callbacks that need whole parameters on rank 0 (FSDP keeps only a shard of each on every rank)
WHOLE_PARAMETER_CALLBACKS = {"ldm.callbacks.ema.EMA": "averages whole parameters and saves them from rank 0",
                             "ldm.callbacks.sample_grid.SampleGrid": "samples on rank 0 alone",
                             "ldm.callbacks.reconstructions.Reconstructions": "decodes on rank 0 alone",
                             "ldm.callbacks.noise_levels.NoiseLevelLoss": "runs the denoiser on rank 0 alone",
                             "ldm.callbacks.metrics.SampleMetrics": "samples with unequal shares per rank, and "
                                                                    "with the EMA weights"}


def strategy_problems(found: Findings) -> None:
    """Multi-process strategies that this project cannot run correctly, refused with what to use instead."""
    strategy = found.value("trainer.strategy", "auto")
    if not isinstance(strategy, str):
        return
    if strategy.startswith(SPAWNING_STRATEGIES):
        found.add(f"trainer.strategy={strategy} trains copies of the model in forked or spawned processes, whose EMA "
                  "and last checkpoint the main process never sees: use trainer.strategy=ddp (trainer=ddp), which "
                  "starts every rank with the job's own config")
    if not strategy.startswith("fsdp"):
        return
    if found.value("trainer.accelerator") == "cpu":
        found.add(f"trainer.strategy={strategy} needs GPUs (torch's FSDP and Lightning refuse CPU devices): on CPUs "
                  "use trainer=ddp trainer.accelerator=cpu")
    callbacks = found.node("callbacks")
    for name in callbacks.keys() if OmegaConf.is_dict(callbacks) else ():
        target = found.value(f"callbacks.{name}._target_")
        if target in WHOLE_PARAMETER_CALLBACKS:
            found.add(f"callbacks.{name} ({target}) {WHOLE_PARAMETER_CALLBACKS[target]}, but "
                      f"trainer.strategy={strategy} keeps only a shard of each parameter on every rank: use "
                      f"trainer=ddp (every rank holds the whole model; each denoiser here fits one GPU), or "
                      f"callbacks.{name}=null to train with FSDP without it")


def optimization_problems(found: Findings) -> None:
    if found.has("optimizer.lr"):
        found.number("optimizer.lr", positive=True, hint="the learning rate must be positive, e.g. optimizer.lr=5e-4")
    if found.has("optimizer.weight_decay"):
        found.number("optimizer.weight_decay", minimum=0, hint="use 0 (none) or a small positive value, e.g. 0.01")
    if found.has("lr_scheduler.warmup_steps"):
        found.integer("lr_scheduler.warmup_steps", minimum=0,
                      hint="a negative warmup trains with a negative learning rate; use 0 (none) or a step count, "
                           "e.g. lr_scheduler.warmup_steps=200")
    if found.has("lr_scheduler.final_ratio"):
        found.number("lr_scheduler.final_ratio", minimum=0, maximum=1, hint="the share of optimizer.lr at the end")
    if found.has("vae.lr"):
        found.number("vae.lr", positive=True, hint="the learning rate must be positive, e.g. vae.lr=1e-3")


def schedule_problems(found: Findings) -> None:
    if found.has("schedule.num_timesteps"):
        found.integer("schedule.num_timesteps", minimum=1, hint="a discrete schedule needs steps, "
                                                                "e.g. schedule.num_timesteps=1000")
    if found.has("schedule.shift"):
        found.number("schedule.shift", positive=True, hint="1 is no shift, SD3 uses 3")
    if found.has("schedule.sigma_min"):
        low = found.number("schedule.sigma_min", positive=True, hint="EDM uses 0.002")
        high = found.number("schedule.sigma_max", positive=True, hint="EDM uses 80")
        if is_number(low) and is_number(high) and low >= high:
            found.add(f"schedule.sigma_min={low} must be smaller than schedule.sigma_max={high}")
    if found.has("schedule.sigma_data"):
        found.number("schedule.sigma_data", positive=True, hint="EDM uses 0.5")
    if found.has("diffusion.sample_steps"):
        found.integer("diffusion.sample_steps", minimum=1, hint="the sampler steps of the sample grids, e.g. 25")
    if found.has("diffusion.sample_guidance"):
        found.number("diffusion.sample_guidance", minimum=0, hint="1 is plain conditional sampling, 0 unconditional")


def model_problems(found: Findings) -> None:
    """The denoiser's sizes, and that it fits the latents the autoencoder makes."""
    latent_channels = found.integer("autoencoder.latent_channels", minimum=1)
    downsample = found.integer("autoencoder.downsample", minimum=1)
    image_size = found.integer("data.image_size", minimum=1, hint="the side of the training images in pixels")
    latent_size = image_size // downsample if is_int(image_size) and is_int(downsample) else UNKNOWN
    if is_int(latent_size) and image_size % downsample:
        found.value("model.input_size")  # its resolver names the sizes that would divide
        latent_size = UNKNOWN
    for key in ("depth", "hidden_size", "num_heads", "patch_size", "num_res_blocks", "channels"):
        if found.has(f"model.{key}"):
            hint = "a DiT with no blocks does not learn; e.g. model.depth=6" if key == "depth" else ""
            found.integer(f"model.{key}", minimum=1, hint=hint)
    in_channels = found.value("model.in_channels")
    if is_int(in_channels) and is_int(latent_channels) and in_channels != latent_channels:
        found.add(f"model.in_channels={in_channels} but the autoencoder makes {latent_channels}-channel latents "
                  f"(autoencoder.latent_channels={latent_channels}): use model.in_channels={latent_channels}, "
                  "or leave it to follow the autoencoder")
    input_size = found.value("model.input_size")
    if is_int(input_size) and is_int(latent_size) and input_size != latent_size:
        found.add(f"model.input_size={input_size} but the latents are {latent_size}x{latent_size} (data.image_size="
                  f"{image_size} / autoencoder.downsample={downsample}): use model.input_size={latent_size}, "
                  "or leave it to follow the data")
    if is_int(input_size):
        latent_size = input_size
    hidden, heads = found.value("model.hidden_size"), found.value("model.num_heads")
    if is_int(hidden) and is_int(heads) and heads > 0 and hidden % heads:
        found.add(f"model.hidden_size={hidden} is not divisible by model.num_heads={heads}: "
                  f"use a multiple of {heads}, or a num_heads that divides {hidden}")
    patch = found.value("model.patch_size")
    if is_int(patch) and patch > 0 and is_int(latent_size) and latent_size % patch:
        found.add(f"model.patch_size={patch} does not divide the {latent_size}x{latent_size} latents (data.image_size="
                  f"{image_size}, autoencoder.downsample={downsample}): use a patch size that divides {latent_size}, "
                  f"or a data.image_size that is a multiple of {patch * (downsample if is_int(downsample) else 1)}")
    mult = found.value("model.channel_mult")
    if isinstance(mult, list) and mult:
        factor = 2 ** (len(mult) - 1)
        if is_int(latent_size) and latent_size % factor:
            found.add(f"model.channel_mult={mult} downsamples the latents by {factor}, which does not divide the "
                      f"{latent_size}x{latent_size} latents: use fewer levels or a data.image_size that is a "
                      f"multiple of {factor * (downsample if is_int(downsample) else 1)}")


def run_problems(found: Findings) -> None:
    found.integer("seed", hint="e.g. seed=0")
    for key in ("data.batch_size", "data.channels"):
        found.integer(key, minimum=1)
    if found.has("data.num_workers"):
        found.integer("data.num_workers", minimum=0, hint="0 loads in the main process")
    if found.has("data.val_fraction"):
        fraction = found.number("data.val_fraction", allow_none=True)
        if is_number(fraction) and not 0 < fraction < 1:
            found.add(f"data.val_fraction={fraction} leaves no "
                      f"{'validation' if fraction <= 0 else 'training'} images (the run would fail at its first "
                      "validation): use a fraction between 0 and 1, e.g. data.val_fraction=0.05")
    embedders = found.node("conditioner.embedders")
    drop_keys = ["conditioner.drop_rate"] + [f"conditioner.embedders.{i}.drop_rate"
                                            for i in range(len(embedders) if OmegaConf.is_list(embedders) else 0)]
    for key in drop_keys:
        if found.has(key):
            found.number(key, minimum=0, maximum=1, hint="the share of training samples whose condition is dropped")
    callbacks = found.node("callbacks")
    for name in callbacks.keys() if OmegaConf.is_dict(callbacks) else ():
        if found.has(f"callbacks.{name}.decay"):
            found.number(f"callbacks.{name}.decay", minimum=0, maximum=1, hint="an EMA decay such as 0.995")


def training_problems(cfg: DictConfig) -> list[str]:
    """Every semantic problem of a composed training config, one line each."""
    from ldm.data_checks import data_problems
    from ldm.run_checks import resume_problems

    found = Findings(cfg)
    task = found.value("task", "diffusion")
    trainer_problems(found)
    strategy_problems(found)
    optimization_problems(found)
    run_problems(found)
    data_problems(found, conditioned=task == "diffusion")
    if task == "diffusion":
        schedule_problems(found)
        model_problems(found)
    resume_problems(found)
    return found.problems


def check_keys_of_training_config(cfg: DictConfig) -> None:
    """Every key of every node against the constructor it goes to, before anything is built."""
    from ldm.autoencoders.training import AutoencoderTraining
    from ldm.diffusion import LatentDiffusion

    check_config(cfg, targets={"diffusion": LatentDiffusion, "vae": AutoencoderTraining}, passed_by_code={
        "diffusion": ("autoencoder", "conditioner", "denoiser", "schedule", "sampler", "image_size", "optimizer",
                      "lr_scheduler", "seed"),
        "vae": ("autoencoder",), "trainer": ("callbacks", "logger", "plugins", "use_distributed_sampler"),
        "optimizer": ("params",), "lr_scheduler": ("optimizer",)})


def check_training(cfg: DictConfig) -> None:
    """Unknown keys and semantic problems of a training config, all in one `ConfigError`."""
    from ldm.training import TASKS

    problems = []
    task = cfg.get("task", "diffusion")
    if task not in TASKS:
        problems.append(f"task={task} is not a task: use one of {', '.join(TASKS)}")
    try:
        check_keys_of_training_config(cfg)
    except ConfigError as error:
        problems += error.errors
    problems += training_problems(cfg)
    if problems:
        raise ConfigError(problems)
