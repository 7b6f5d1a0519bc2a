"""The range of every number a config passes to a constructor, declared beside its argument's name.

`RANGES` maps each callable a shipped config names (its canonical `module.qualname`, so aliases and
renamed targets share one entry) to {argument: rule}; `range_problems` walks the composed config to
every node with a `_target_` (and the nodes the code builds itself, `diffusion` and `vae`) and checks
each key that has a rule. tests/test_ranges.py fails when a numeric argument of any target reachable
from conf/ has no rule here, so a new argument cannot slip by unchecked. Relations between keys (a
patch size that divides the latents, sigma_min below sigma_max) stay in training.py.

A float that is NaN or infinite is refused wherever it stands in the config, ruled or not.
"""

from __future__ import annotations

import math
import pkgutil
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from omegaconf import OmegaConf

from ldm.checks.findings import UNKNOWN, Findings, hint_text, is_int, is_number, show
from ldm.checks.keys import HYDRA_KEYS, SKIPPED_ROOTS
from ldm.utils.power_ema import MAX_SIGMA_REL


@dataclass(frozen=True)
class Number:
    """A number from `minimum` to `maximum` (`*_open`: the bound itself excluded); `whole`: an int.

    `also`: other values taken as they are (-1 for "no limit", "auto"); `others`: types passed on
    unchecked; `lists`: a list of such numbers is taken too (of `length` numbers, when given); `multiple_of`:
    a size the value must divide by; `infinite`: +inf is a value (the max-norm)."""

    minimum: float | None = None
    maximum: float | None = None
    minimum_open: bool = False
    maximum_open: bool = False
    whole: bool = False
    also: tuple = ()
    others: tuple[type, ...] = ()
    lists: bool = False
    multiple_of: int | None = None
    infinite: bool = False
    length: int | None = None
    hint: str = ""

    def problem(self, key: str, value: Any) -> str | None:
        """One line naming `key`, `value` and the range, or None when the value is in it."""
        if any(value is other or (type(value) is type(other) and value == other) for other in self.also):
            return None
        if isinstance(value, self.others) and not is_number(value):
            return None
        if self.lists and isinstance(value, (list, tuple)):
            if self.length is not None and len(value) != self.length:
                return f"{key}={show(value)} has {len(value)} values: give {self.length}{hint_text(self.hint)}"
            return next(filter(None, (self.problem(key, item) for item in value)), None)
        if not (is_int(value) if self.whole else is_number(value)):
            kind = "a whole number" if self.whole else "a number"
            return f"{key}={value!r} is not {kind}{self.accepted()}{hint_text(self.hint)}"
        if math.isnan(value) or math.isinf(value) and not (self.infinite and value > 0):
            return f"{key}={value} is not a finite number{hint_text(self.hint)}"
        low_ok = self.minimum is None or (value > self.minimum if self.minimum_open else value >= self.minimum)
        high_ok = self.maximum is None or (value < self.maximum if self.maximum_open else value <= self.maximum)
        if not (low_ok and high_ok):
            return f"{key}={value} must be {self.bounds()}{self.accepted()}{hint_text(self.hint)}"
        if self.multiple_of and value % self.multiple_of:
            return f"{key}={value} must be a multiple of {self.multiple_of}{hint_text(self.hint)}"
        return None

    def bounds(self) -> str:
        low, high = (bound if bound is None or is_int(bound) else f"{bound:g}"
                     for bound in (self.minimum, self.maximum))
        if low is not None and high is not None:
            return f"in {'(' if self.minimum_open else '['}{low}, {high}{')' if self.maximum_open else ']'}"
        if low is not None:
            return f"greater than {low}" if self.minimum_open else f"at least {low}"
        return f"less than {high}" if self.maximum_open else f"at most {high}"

    def accepted(self) -> str:
        return f" (or {', '.join(map(show, self.also))})" if self.also else ""


@dataclass(frozen=True)
class Duration:
    """A time as Lightning reads it (max_time, a val_check_interval given as a time): a "DD:HH:MM:SS" string,
    or whole non-negative numbers of days, hours, minutes and seconds."""

    # Lightning's own pattern (its Timer callback); "01:00" would not be an hour there but an error
    PATTERN = re.compile(r"(\d+):(\d\d):(\d\d):(\d\d)")
    UNITS = ("days", "hours", "minutes", "seconds")

    def problem(self, key: str, value: Any) -> str | None:
        if value is None or isinstance(value, str) and self.PATTERN.fullmatch(value.strip()):
            return None
        if (isinstance(value, Mapping) and value and set(value) <= set(self.UNITS)
                and all(is_int(part) and part >= 0 for part in value.values())):
            return None
        return (f"{key}={show(value)} is not a time: give DD:HH:MM:SS, e.g. {key}=00:12:00:00 for 12 hours, or "
                "whole non-negative days, hours, minutes, seconds, e.g. {hours: 12}")


@dataclass(frozen=True)
class StepsOrFraction:
    """Lightning's int-or-float arguments: an int counts steps or batches, a float is a fraction of an epoch;
    with `time`, a string or mapping is a time (val_check_interval)."""

    steps: Number
    fraction: Number
    time: Duration | None = None

    def problem(self, key: str, value: Any) -> str | None:
        if value is None:
            return None
        if self.time is not None and isinstance(value, (str, Mapping)):
            return self.time.problem(key, value)
        return (self.steps if is_int(value) or not is_number(value) else self.fraction).problem(key, value)


@dataclass(frozen=True)
class OneOf:
    """A value from a fixed list (Lightning's precision names); `others`: types passed on unchecked."""

    values: tuple
    others: tuple[type, ...] = ()

    def problem(self, key: str, value: Any) -> str | None:
        if any(type(value) is type(choice) and value == choice for choice in self.values):
            return None
        if isinstance(value, self.others):
            return None
        return f"{key}={show(value)} is not one of {', '.join(dict.fromkeys(map(show, self.values)))}"


@dataclass(frozen=True)
class Devices:
    """Lightning's `devices`: a count (-1: all), "auto", device indices as a list or "0,1", or a count as text."""

    INDICES = re.compile(r"\s*-?\d+\s*(,\s*\d+\s*)*,?")

    def problem(self, key: str, value: Any) -> str | None:
        if value == "auto" or isinstance(value, str) and self.INDICES.fullmatch(value):
            return None
        if isinstance(value, (list, tuple)) and value and all(is_int(index) and index >= 0 for index in value):
            return None
        if is_int(value) and (value >= 1 or value == -1):
            return None
        return (f"{key}={show(value)} is not a device count: give a number of devices (e.g. {key}=2), -1 (all), "
                "auto, or device indices (e.g. [0,1])")


Rule = Number | StepsOrFraction | OneOf | Duration | Devices


def whole(minimum: int | None = None, maximum: int | None = None, **options: Any) -> Number:
    return Number(minimum, maximum, whole=True, **options)


def real(minimum: float | None = None, maximum: float | None = None, **options: Any) -> Number:
    return Number(minimum, maximum, **options)


COUNT = whole(1)                       # sizes, channels, steps, batches: at least one
STEPS = whole(0)                       # step counts where 0 is "none" / "from the start"
SEED = whole(0, 2**32 - 1, hint="a seed is a whole number from 0 to 2**32 - 1 (numpy's range), e.g. 0")
REAL = real()                          # any finite number (means, shifts)
POSITIVE = real(0, minimum_open=True)  # scales, standard deviations, sigmas, learning rates
NON_NEGATIVE = real(0)
PROBABILITY = real(0, 1)
FRACTION = real(0, 1, minimum_open=True, maximum_open=True)  # a share that must leave something on both sides
GUIDANCE = real(0, hint="1 is plain conditional sampling, 0 unconditional")
FLAG = OneOf((True, False))            # a switch (null, where taken, is "the library decides")
# a power-function EMA's length relative to the training time; 1 / sqrt(12) is the plain mean of every step so far
SIGMA_REL = real(0, MAX_SIGMA_REL, minimum_open=True, maximum_open=True, lists=True,
                 hint="EMA lengths relative to the training time; EDM2 tracks [0.05, 0.10]")
SIZES = whole(1, lists=True)           # an int or one per dimension; channel multipliers
INTERVAL = real(0, lists=True, hint="noise levels sigma/alpha, e.g. [0.3, 5.0]")
GUIDANCE_PARTS = {"scale": GUIDANCE, "rescale": real(0, 1, hint="0 is no rescale, 0.7 as in Lin et al."),
                  "interval": INTERVAL, "interval_t": real(0, 1, lists=True, hint="times, e.g. [0.1, 0.9]")}
DATA = {"image_size": COUNT, "channels": COUNT, "num_classes": COUNT, "batch_size": COUNT,
        "num_workers": whole(0, hint="0 loads in the main process"), "val_batch_size": COUNT, "seed": SEED,
        "val_fraction": real(0, 1, minimum_open=True, maximum_open=True,
                             hint="0 leaves no validation images and 1 no training images, e.g. 0.05")}
VP = {"num_timesteps": whole(1, hint="a discrete schedule needs steps, e.g. schedule.num_timesteps=1000"),
      "min_snr_gamma": POSITIVE}
DENOISER = {"in_channels": COUNT, "out_channels": COUNT, "vector_dim": COUNT, "context_dim": COUNT,
            "concat_channels": whole(0), "input_size": SIZES, "time_scale": POSITIVE}
BATCHES = StepsOrFraction(whole(0), real(0, 1))  # limit_*_batches, overfit_batches: 0 is none, 1.0 all
# what Lightning's Trainer(precision=) takes, and the project's own "auto" (ldm/run/build.py resolves it)
PRECISIONS = ("auto", 64, 32, 16, "64", "32", "16", "bf16", "64-true", "32-true", "16-true", "bf16-true",
              "16-mixed", "bf16-mixed", "transformer-engine", "transformer-engine-float16")

RANGES: dict[str, dict[str, Rule]] = {
    # the nodes the code builds itself: diffusion -> LatentDiffusion, vae -> AutoencoderTraining
    "ldm.tasks.diffusion.LatentDiffusion": {
        "image_size": COUNT, "scale_factor": POSITIVE, "shift_factor": REAL, "seed": SEED,
        "sample_steps": whole(1, hint="the sampler steps of the sample grids, e.g. 25"),
        "sample_guidance": GUIDANCE},
    "ldm.tasks.autoencoder.AutoencoderTraining": {
        "lr": real(0, minimum_open=True, hint="the learning rate must be positive, e.g. vae.lr=1e-3"),
        "kl_weight": NON_NEGATIVE},
    # optimizer, lr_scheduler
    "torch.optim.adamw.AdamW": {
        "lr": real(0, minimum_open=True, hint="the learning rate must be positive, e.g. optimizer.lr=5e-4"),
        "betas": real(0, 1, maximum_open=True, lists=True, length=2,
                      hint="the two decays of the moment averages, e.g. [0.9, 0.999]"),
        "eps": POSITIVE, "weight_decay": real(0, hint="use 0 (none) or a small positive value, e.g. 0.01"),
        # torch takes any text as true here
        "amsgrad": FLAG, "maximize": FLAG, "foreach": FLAG, "fused": FLAG, "capturable": FLAG, "differentiable": FLAG},
    "ldm.tasks.optim.constant": {"warmup_steps": whole(0, hint="use 0 (none) or a step count, e.g. 200")},
    "ldm.tasks.optim.warmup_cosine": {
        "warmup_steps": whole(0, hint="use 0 (none) or a step count, e.g. 200"), "total_steps": COUNT,
        "final_ratio": real(0, 1, hint="the share of optimizer.lr at the end")},
    # model
    "ldm.models.dit.DiT": {
        **DENOISER, "patch_size": COUNT, "hidden_size": COUNT, "num_heads": COUNT, "mlp_ratio": POSITIVE,
        "depth": whole(1, hint="a DiT with no blocks does not learn; e.g. model.depth=6"),
        "time_frequency_shift": REAL},
    "ldm.models.unet.UNet": {
        **DENOISER, "channels": COUNT, "channel_mult": SIZES, "num_res_blocks": COUNT, "num_heads": COUNT,
        "attention_resolutions": whole(1, lists=True, hint="downsampling factors 1, 2, 4, ... that get attention"),
        "num_head_channels": whole(1, also=(-1,), hint="-1: model.num_heads sets the heads"),
        "transformer_depth": COUNT, "dropout": real(0, 1, maximum_open=True)},
    "ldm.finetune.lora.LoRA": {"rank": whole(1, hint="the adapters' rank, e.g. finetune.rank=8"),
                               "alpha": real(0, minimum_open=True, hint="the update is scaled by alpha / rank, e.g. 8"),
                               "dropout": real(0, 1, maximum_open=True)},
    # autoencoder
    "ldm.autoencoders.identity.IdentityAutoencoder": {"latent_channels": COUNT, "downsample": COUNT},
    "ldm.autoencoders.kl.KLAutoencoder": {
        "in_channels": COUNT, "latent_channels": COUNT, "channels": COUNT, "channel_mult": SIZES,
        "downsample": COUNT},
    "ldm.autoencoders.sd_vae.SDAutoencoder": {
        "in_channels": COUNT, "out_channels": COUNT, "channels": COUNT, "channel_mult": SIZES,
        "num_res_blocks": COUNT, "latent_channels": COUNT, "downsample": COUNT, "scale_factor": POSITIVE,
        "shift_factor": REAL, "tile_size": COUNT, "tile_overlap": whole(0), "slice_size": COUNT},
    # conditioner
    "ldm.conditioners.conditioner.Conditioner": {
        "vector_dim": COUNT, "context_dim": COUNT,
        "drop_rate": real(0, 1, hint="the share of training samples whose condition is dropped")},
    "ldm.conditioners.class_embedder.ClassEmbedder": {
        "num_classes": COUNT, "embed_dim": COUNT,
        "drop_rate": real(0, 1, hint="the share of training samples whose condition is dropped")},
    "ldm.conditioners.clip_text.ClipTextEmbedder": {
        "embed_dim": COUNT, "layer": whole(maximum=-1, also=("last", "penultimate"), hint="-k: the k-th block "
                                                                                          "from the end"),
        "drop_rate": real(0, 1, hint="the share of training samples whose condition is dropped")},
    # schedule, its time sampler and loss weight
    "ldm.schedules.flow.RectifiedFlow": {"shift": real(0, minimum_open=True, hint="1 is no shift, SD3 uses 3"),
                                         "logit_mean": REAL, "logit_std": POSITIVE},
    "ldm.schedules.edm.EDM": {"sigma_min": real(0, minimum_open=True, hint="EDM uses 0.002"),
                              "sigma_max": real(0, minimum_open=True, hint="EDM uses 80"), "rho": POSITIVE,
                              "sigma_data": real(0, minimum_open=True, hint="EDM uses 0.5"),
                              "p_mean": REAL, "p_std": POSITIVE},
    "ldm.schedules.ddpm.DDPM": VP, "ldm.schedules.v.VPrediction": VP, "ldm.schedules.x0.X0Prediction": VP,
    "ldm.schedules.time_samplers.Discrete": {"num_timesteps": COUNT},
    "ldm.schedules.time_samplers.LogNormal": {"p_mean": REAL, "p_std": POSITIVE},
    "ldm.schedules.time_samplers.LogitNormal": {"mean": REAL, "std": POSITIVE},
    "ldm.schedules.time_samplers.Mode": {"scale": real(-1, 2 / (math.pi - 2),
                                                       hint="at most 2 / (pi - 2); > 0 favours middle times")},
    "ldm.schedules.loss_weights.MinSNRWeight": {"gamma": POSITIVE},
    "ldm.schedules.loss_weights.EDMWeight": {"sigma_data": POSITIVE},
    # guidance, and the classifier of classifier guidance
    "ldm.guidance.spec.CFG": GUIDANCE_PARTS,
    "ldm.guidance.spec.Auto": {**GUIDANCE_PARTS, "scale": real(0, hint="1 is unguided, 2 to 3 usual")},
    "ldm.guidance.spec.Classifier": {**GUIDANCE_PARTS, "scale": real(0, hint="ADM's s: 0 is no classifier, 1 p(x|y)"),
                                     "cfg_scale": GUIDANCE},
    "ldm.classifiers.encoder.NoisyClassifier": {
        "in_channels": COUNT, "num_classes": COUNT,
        "channels": whole(32, multiple_of=32, hint="GroupNorm of 32 groups: a multiple of 32, e.g. 64"),
        "channel_mult": SIZES, "num_res_blocks": COUNT, "time_scale": POSITIVE,
        "dropout": real(0, 1, maximum_open=True)},
    # sampler
    "ldm.samplers.euler_ancestral.EulerAncestral": {"eta": real(0, 1, hint="0 is Euler, 1 full ancestral noise")},
    # data
    "ldm.data.datamodule.DataModule": DATA,
    "ldm.data.streaming.StreamingDataModule": {**DATA, "global_batch_size": COUNT},
    "ldm.data.digits.DigitsDataset": {"image_size": COUNT, "thicken": whole(0, hint="pixels added to each side of "
                                                                                    "the strokes, 0: none")},
    "ldm.data.folder.FolderDataset": {"image_size": COUNT, "val_fraction": DATA["val_fraction"], "seed": SEED},
    "ldm.data.imagenet.ImageNetDataset": {"image_size": COUNT, "num_classes": COUNT},
    "ldm.data.shapes.ShapesDataset": {"num_samples": COUNT, "image_size": COUNT, "seed": SEED},
    # callbacks
    "ldm.callbacks.ema.EMA": {"decay": real(0, 1, maximum_open=True, hint="an EMA decay such as 0.995 (1 would "
                                                                             "never move)"),
                              "update_starting_at_step": STEPS, "update_every_n_steps": COUNT},
    "ldm.callbacks.phema.PostHocEMA": {"sigma_rels": SIGMA_REL, "snapshot_every": COUNT},
    "ldm.callbacks.grad_norm.GradNorm": {"norm_type": real(0, minimum_open=True, infinite=True,
                                                           hint="2 is the usual norm, inf the largest entry")},
    "ldm.callbacks.metrics.SampleMetrics": {
        "num_samples": whole(2, hint="a distance between feature sets needs at least 2 samples"),
        "every_n_steps": COUNT, "batch_size": COUNT, "steps": COUNT, "guidance": GUIDANCE, "seed": SEED,
        "prompt_table": whole(0)},
    "ldm.callbacks.noise_levels.NoiseLevelLoss": {"bins": COUNT, "batch_size": COUNT, "seed": SEED},
    "ldm.callbacks.progress.progress_bar": {"every_n_steps": COUNT, "every_seconds": POSITIVE},
    "ldm.callbacks.reconstructions.Reconstructions": {"count": COUNT, "upscale": COUNT},
    "ldm.callbacks.sample_grid.SampleGrid": {"per_row": COUNT, "seed": SEED, "upscale": COUNT},
    "ldm.callbacks.throughput.Throughput": {"window": whole(2, hint="a rate needs two steps")},
    "lightning.pytorch.callbacks.model_checkpoint.ModelCheckpoint": {
        "save_top_k": whole(-1, hint="-1 keeps every checkpoint, 0 none"), "every_n_train_steps": STEPS,
        "every_n_epochs": STEPS},
    # logger
    "ldm.run.loggers.ContinuedCSVLogger": {"version": whole(0, others=(str,)), "flush_logs_every_n_steps": COUNT},
    "lightning.pytorch.loggers.tensorboard.TensorBoardLogger": {"version": whole(0, others=(str,))},
    # metrics (evaluate.py, and the sample_metrics callback)
    "ldm.metrics.suite.build_suite": {
        "dinov2_image_size": whole(14, multiple_of=14, hint="DINOv2's patches are 14 pixels, e.g. 224"),
        "kid_subsets": COUNT, "kid_subset_size": whole(2), "nearest_k": COUNT, "max_features": whole(2),
        "seed": SEED},
    # trainer
    "lightning.pytorch.trainer.trainer.Trainer": {
        "devices": Devices(),
        "num_nodes": COUNT, "precision": OneOf(PRECISIONS),
        "fast_dev_run": whole(0, also=(True, False), hint="true, or a number of batches"),
        "max_time": Duration(), "max_epochs": whole(-1, hint="-1: no limit"), "min_epochs": whole(0),
        "max_steps": whole(-1, hint="use a positive number of optimizer steps, or -1 (no limit) with "
                                    "trainer.max_time"),
        "min_steps": whole(0),
        "limit_train_batches": BATCHES, "limit_val_batches": BATCHES, "limit_test_batches": BATCHES,
        "limit_predict_batches": BATCHES, "overfit_batches": BATCHES,
        "val_check_interval": StepsOrFraction(
            whole(1, hint="whole optimizer steps, e.g. trainer.val_check_interval=500"),
            real(0, 1, minimum_open=True, hint="a float is a fraction of an epoch; give whole steps as an int, "
                                               "e.g. trainer.val_check_interval=500"),
            time=Duration()),  # a time: Lightning's "00:00:30:00" or {minutes: 30}
        "check_val_every_n_epoch": COUNT, "num_sanity_val_steps": whole(-1, hint="-1: the whole validation set"),
        "log_every_n_steps": whole(1, hint="steps between logged values, e.g. 10"), "accumulate_grad_batches": COUNT,
        "gradient_clip_val": real(0, hint="0: no clipping"), "reload_dataloaders_every_n_epochs": whole(0),
        # what Lightning takes of its text settings (it would fail on anything else only when the run starts,
        # or, for deterministic, take any text as true)
        "gradient_clip_algorithm": OneOf(("norm", "value")), "deterministic": OneOf((True, False, "warn")),
        "profiler": OneOf(("simple", "advanced", "pytorch", "xla"), others=(Mapping,))},
}
# the nodes without a `_target_` that the code passes to a callable itself
BUILT_BY_CODE = {"diffusion": "ldm.tasks.diffusion.LatentDiffusion", "vae": "ldm.tasks.autoencoder.AutoencoderTraining"}


def target_name(target: Callable) -> str:
    """The canonical name of a callable: one name for `ldm.schedules.DDPM` and `ldm.schedules.vp.DDPM`."""
    return f"{target.__module__}.{target.__qualname__}"


def range_problems(found: Findings, built_by_code: Mapping[str, str] = BUILT_BY_CODE) -> None:
    """Every ruled key of every node with a `_target_` out of its range, and any NaN or infinite float."""
    tree = OmegaConf.to_container(found.cfg, resolve=False)
    for key, value in tree.items():
        if key not in SKIPPED_ROOTS:
            _walk(found, value, str(key), built_by_code)


def _walk(found: Findings, node: Any, path: str, built_by_code: Mapping[str, str]) -> None:
    if isinstance(node, Mapping):
        target = _callable(node.get("_target_", built_by_code.get(path)))
        rules = RANGES.get(target_name(target), {}) if target is not None else {}
        for key, child in node.items():
            # a node given where a number may stand (`guidance`: a scale or a guidance node) has rules of its own
            node_of_its_own = isinstance(child, Mapping) and "_target_" in child
            if key in rules and not _follows_another_key(child) and not node_of_its_own:
                check_value(found, f"{path}.{key}", rules[key])
            elif key not in HYDRA_KEYS:
                _walk(found, child, f"{path}.{key}", built_by_code)
    elif isinstance(node, list):
        for index, child in enumerate(node):
            _walk(found, child, f"{path}.{index}", built_by_code)
    elif isinstance(node, float) and not math.isfinite(node):  # NaN and inf are no setting's value
        found.add(f"{path}={node} is not a finite number", key=path)


def check_value(found: Findings, key: str, rule: Rule) -> None:
    """`key`'s value against `rule` (a key that no constructor takes, such as the top-level `seed`)."""
    value = found.value(key)
    if value is UNKNOWN or value is None:  # null is "not set" (whether the argument takes it is a type question)
        return
    if problem := rule.problem(key, value):
        found.add(problem, key=key)


def _follows_another_key(value: Any) -> bool:
    """`${data.val_fraction}`: the key it names is checked where the user sets it, and named there."""
    return isinstance(value, str) and bool(re.fullmatch(r"\$\{[\w.]+\}", value))


def _callable(target: Any) -> Callable | None:
    if not isinstance(target, str) or not target or "${" in target or target == "???":
        return None
    try:
        return pkgutil.resolve_name(target)
    except Exception:  # the key check reports a target that cannot be imported
        return None
