"""The composed training config checked before anything is built: types, ranges and cross-group consistency.

`check_training(cfg)` raises one `ConfigError` that lists every problem, one line each naming the key,
the value and what would be right. It reads only the config and cheap facts (a data set's declared
classes and item keys, a weight file's header); it never builds a model.
"""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from ldm.checks.data import data_problems
from ldm.checks.ema import power_ema_problems, power_ema_switched_off
from ldm.checks.findings import UNKNOWN, Findings, is_int, is_number
from ldm.checks.finetune import finetune_problems, init_from_kind_problems
from ldm.checks.guidance import guidance_problems
from ldm.checks.hardware import accelerator_problems, precision_package_problems, strategy_name_problems
from ldm.checks.keys import check_config
from ldm.checks.loggers import wandb_problems
from ldm.checks.other_runs import init_from_problems, resume_settings_problems
from ldm.checks.ranges import SEED, check_value, range_problems
from ldm.checks.run_dir import resume_problems
from ldm.checks.weights import published_weight_problems
from ldm.run.tasks import TASKS
from ldm.tasks.autoencoder import AutoencoderTraining
from ldm.tasks.diffusion import LatentDiffusion
from ldm.utils.errors import ConfigError


def trainer_problems(found: Findings) -> None:
    """What the trainer's keys mean together (each key's own range is in ranges.py)."""
    fast_dev_run = found.value("trainer.fast_dev_run", False)
    max_steps = found.value("trainer.max_steps")
    if max_steps == 0 and not fast_dev_run:
        found.add("trainer.max_steps=0 trains nothing and leaves no checkpoint: use a positive number of steps, "
                  "e.g. trainer.max_steps=2500", key="trainer.max_steps")
    max_epochs, max_time = found.value("trainer.max_epochs"), found.value("trainer.max_time")
    if max_steps == -1 and max_epochs == -1 and max_time is None and not fast_dev_run:
        found.add("trainer.max_steps=-1 with trainer.max_epochs=-1 and trainer.max_time=null never stops: give a "
                  "number of optimizer steps (e.g. trainer.max_steps=2000) or a time limit (e.g. "
                  "trainer.max_time=00:01:00:00)", key="trainer.max_steps")
    if found.value("trainer.enable_progress_bar") is False and found.node("callbacks.progress") is not None:
        found.add("trainer.enable_progress_bar=false but callbacks.progress sets a progress bar (Lightning refuses "
                  "both): switch it off with callbacks.progress=null")
    interval = found.value("trainer.val_check_interval")
    if is_int(interval) and is_int(max_steps) and 0 < max_steps < interval and not fast_dev_run:
        found.add(f"trainer.val_check_interval={interval} is larger than trainer.max_steps={max_steps}: the run "
                  f"would never validate (no val/loss, no sample grid); use at most {max_steps}, "
                  f"e.g. trainer.val_check_interval={max_steps}")


# Lightning strategies whose ranks train copies made by fork / spawn: the main process never sees their EMA
# or their last checkpoint, and would draw the final grid with the untrained weights it kept
SPAWNING_STRATEGIES = ("ddp_spawn", "ddp_fork", "ddp_notebook")
# callbacks that need whole parameters on rank 0 (FSDP keeps only a shard of each on every rank)
WHOLE_PARAMETER_CALLBACKS = {"ldm.callbacks.ema.EMA": "averages whole parameters and saves them from rank 0",
                             "ldm.callbacks.phema.PostHocEMA": "averages whole parameters and saves them from rank 0",
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
        if target in WHOLE_PARAMETER_CALLBACKS and not power_ema_switched_off(found, name):
            found.add(f"callbacks.{name} ({target}) {WHOLE_PARAMETER_CALLBACKS[target]}, but "
                      f"trainer.strategy={strategy} keeps only a shard of each parameter on every rank: use "
                      f"trainer=ddp (every rank holds the whole model; each denoiser here fits one GPU), or "
                      f"callbacks.{name}=null to train with FSDP without it")


def optimization_problems(found: Findings) -> None:
    """The optimizer's learning rate and decay whichever optimizer the config names (AdamW's are in ranges.py)."""
    if found.has("optimizer.lr"):
        found.number("optimizer.lr", positive=True, hint="the learning rate must be positive, e.g. optimizer.lr=5e-4")
    if found.has("optimizer.weight_decay"):
        found.number("optimizer.weight_decay", minimum=0, hint="use 0 (none) or a small positive value, e.g. 0.01")
    if found.value("optimizer.maximize") is True:
        found.add("optimizer.maximize=true would make the optimizer climb the training loss: leave it false")


def schedule_problems(found: Findings) -> None:
    low, high = found.value("schedule.sigma_min"), found.value("schedule.sigma_max")
    if is_number(low) and is_number(high) and low >= high:
        found.add(f"schedule.sigma_min={low} must be smaller than schedule.sigma_max={high}")


def model_problems(found: Findings) -> None:
    """The denoiser's sizes, and that it fits the latents the autoencoder makes."""
    latent_channels = found.integer("autoencoder.latent_channels", minimum=1)
    downsample = found.integer("autoencoder.downsample", minimum=1)
    image_size = found.integer("data.image_size", minimum=1, hint="the side of the training images in pixels")
    latent_size = image_size // downsample if is_int(image_size) and is_int(downsample) else UNKNOWN
    if is_int(latent_size) and image_size % downsample:
        found.value("model.input_size")  # its resolver names the sizes that would divide
        latent_size = UNKNOWN
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


def classifier_task_problems(found: Findings) -> None:
    """task=classifier learns the class labels of the data set: it needs some."""
    classes = found.value("data.num_classes")
    if not is_int(classes):
        found.add(f"task=classifier learns the data's class labels, but data.num_classes={classes}: train it on a "
                  "labelled data set (e.g. data=digits)")


def run_problems(found: Findings) -> None:
    if found.integer("seed", hint="e.g. seed=0") is not UNKNOWN:
        check_value(found, "seed", SEED)  # Lightning's seed_everything takes numpy's seeds only
    for key in ("data.batch_size", "data.channels"):
        found.integer(key, minimum=1)


def training_problems(cfg: DictConfig) -> list[str]:
    """Every semantic problem of a composed training config, one line each."""
    found = Findings(cfg)
    task = found.value("task", "diffusion")
    range_problems(found)
    power_ema_problems(found)
    trainer_problems(found)
    accelerator_problems(found)
    strategy_name_problems(found)
    precision_package_problems(found)
    strategy_problems(found)
    wandb_problems(found)
    optimization_problems(found)
    run_problems(found)
    data_problems(found, conditioned=task in ("diffusion", "classifier"))
    if task == "classifier":
        classifier_task_problems(found)
    if task == "diffusion":
        schedule_problems(found)
        model_problems(found)
        published_weight_problems(found)
        guidance_problems(found, cfg)  # how the sample grids and metrics guide
        finetune_problems(found)
    resume_problems(found)
    resume_settings_problems(found)
    init_from_problems(found)
    init_from_kind_problems(found)
    return found.problems


def check_keys_of_training_config(cfg: DictConfig) -> None:
    """Every key of every node against the constructor it goes to, before anything is built."""
    check_config(cfg, targets={"diffusion": LatentDiffusion, "vae": AutoencoderTraining}, passed_by_code={
        "diffusion": ("autoencoder", "conditioner", "denoiser", "schedule", "sampler", "image_size", "optimizer",
                      "lr_scheduler", "seed"),
        "vae": ("autoencoder",), "trainer": ("callbacks", "logger", "plugins", "use_distributed_sampler"),
        "optimizer": ("params",), "lr_scheduler": ("optimizer",)})


def check_training(cfg: DictConfig) -> None:
    """Unknown keys and semantic problems of a training config, all in one `ConfigError`."""
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
