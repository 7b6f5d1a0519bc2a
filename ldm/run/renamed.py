"""What moved: command-line keys (an old spelling gets one line naming the new one, not Hydra's struct error)
and the modules behind config targets (a run directory made before a move still loads, samples and resumes)."""

from __future__ import annotations

import re

from omegaconf import DictConfig, OmegaConf

from ldm.utils.config import CONF

RENAMED = {
    "diffusion.lr": "optimizer.lr",
    "diffusion.weight_decay": "optimizer.weight_decay",
    "diffusion.betas": "optimizer.betas",
    "diffusion.warmup_steps": "lr_scheduler.warmup_steps",
}


def renamed_overrides(arguments: list[str]) -> list[str]:
    """One message per argument that uses a moved key."""
    messages = []
    for argument in arguments:
        key = argument.split("=", 1)[0].lstrip("+~")
        if key in RENAMED:
            messages.append(f"{key} is now {RENAMED[key]}: write {argument.replace(key, RENAMED[key], 1)}")
    return messages


# the guidance keys of sample.py and evaluate.py before guidance was a config group (conf/guidance)
GUIDANCE_KEYS = {"guidance_rescale": "guidance.rescale", "guidance_interval": "guidance.interval_t"}
# Hydra's sweep functions, which may wrap the values of an override
SWEEP_FUNCTIONS = {"range", "choice", "interval", "glob", "sort", "shuffle", "tag", "int", "float", "str", "bool"}


def guidance_arguments(arguments: list[str]) -> tuple[list[str], list[str]]:
    """`guidance=G` with G a number (or numbers to sweep, or null) is the classifier-free scale `guidance.scale=G`,
    as it was before guidance was a group; `guidance_rescale=` and `guidance_interval=` (in t) moved the same way.
    Returns the arguments for Hydra and one message per `guidance=` value that is neither an option nor a number."""
    options = sorted(path.stem for path in (CONF / "guidance").glob("*.yaml"))
    out, problems = [], []
    for argument in arguments:
        key, equals, value = argument.partition("=")
        bare = key.lstrip("+~")
        if bare in GUIDANCE_KEYS and equals:
            out.append(f"{GUIDANCE_KEYS[bare]}={value}")
            continue
        if bare != "guidance" or not equals or key != bare:
            out.append(argument)
            continue
        words = [word for word in re.split(r"[\s,()\[\]=:]+", value) if word and word not in SWEEP_FUNCTIONS]
        if any(word in options for word in words):
            out.append(argument)
        elif all(word == "null" or _is_number(word) for word in words):
            out.append(f"guidance.scale={value}")
        else:
            problems.append(f"guidance={value}: no such guidance; choose one of {', '.join(options)} (conf/guidance), "
                            "or give a number, the classifier-free scale (guidance=2 sets guidance.scale=2)")
    return out, problems


def _is_number(word: str) -> bool:
    try:
        float(word)
    except ValueError:
        return False
    return True


# modules that moved into the layered packages; a run directory's config may still name the old paths
MOVED_MODULES = {
    "ldm.errors": "ldm.utils.errors",
    "ldm.files": "ldm.utils.files",
    "ldm.noise": "ldm.utils.noise",
    "ldm.images": "ldm.utils.images",
    "ldm.fingerprint": "ldm.utils.fingerprint",
    "ldm.config": "ldm.utils.config",
    "ldm.quiet": "ldm.utils.quiet",
    "ldm.checkpoint": "ldm.utils.checkpoint",
    "ldm.conditioners.conditioning": "ldm.contracts.conditioning",
    "ldm.models.contract": "ldm.contracts.denoiser",
    "ldm.autoencoders.base": "ldm.contracts.autoencoder",
    "ldm.data.batch": "ldm.contracts.batch",
    "ldm.pretrained.files": "ldm.weights.files",
    "ldm.pretrained.clip_text": "ldm.weights.clip_text",
    "ldm.pretrained.dit": "ldm.weights.dit",
    "ldm.pretrained.unet": "ldm.weights.unet",
    "ldm.pretrained.vae": "ldm.weights.vae",
    "ldm.diffusion": "ldm.tasks.diffusion",
    "ldm.optim": "ldm.tasks.optim",
    "ldm.autoencoders.training": "ldm.tasks.autoencoder",
    "ldm.build": "ldm.run.build",
    "ldm.trust": "ldm.run.trust",
    "ldm.presets": "ldm.run.presets",
    "ldm.loggers": "ldm.run.loggers",
    "ldm.requeue": "ldm.run.requeue",
    "ldm.distributed": "ldm.run.ranks",
    "ldm.checkpoint_io": "ldm.run.checkpoint_io",
    "ldm.diffusion_task": "ldm.run.diffusion_task",
    "ldm.autoencoders.task": "ldm.run.autoencoder_task",
    "ldm.renamed": "ldm.run.renamed",
    "ldm.validate": "ldm.checks.keys",
    "ldm.checks": "ldm.checks.training",
    "ldm.data_checks": "ldm.checks.data",
    "ldm.run_checks": "ldm.checks.run_dir",
    "ldm.sample_checks": "ldm.checks.sampling",
    "ldm.hydra_hooks": "ldm.checks.hydra",
    "ldm.evaluation.checks": "ldm.checks.evaluation",
    "ldm.training": "ldm.commands.train",
    "ldm.sampling": "ldm.commands.sample",
    "ldm.evaluate": "ldm.commands.evaluate",
    "ldm.export": "ldm.commands.export",
    "ldm.bench": "ldm.tools.bench",
    "ldm.samplers.error_table": "ldm.tools.sampler_table",
    "ldm.samplers.exact": "ldm.tools.exact_gaussian",
    "ldm.samplers.w2": "ldm.tools.w2",
    "ldm.data.streaming_check": "ldm.tools.streaming_check",
    "ldm.metrics.train_features": "ldm.tools.train_features",
}


def current_target(target: str) -> str:
    """`target` with the longest moved module prefix replaced by where it lives now."""
    parts = target.split(".")
    for length in range(len(parts) - 1, 0, -1):
        module = ".".join(parts[:length])
        if module in MOVED_MODULES:
            return ".".join([MOVED_MODULES[module], *parts[length:]])
    return target


def with_current_targets(cfg: DictConfig) -> DictConfig:
    """A copy of a stored config whose `_target_`s name the modules' current paths (interpolations untouched)."""
    def walk(node):
        if isinstance(node, dict):
            return {key: current_target(value) if key == "_target_" and isinstance(value, str) else walk(value)
                    for key, value in node.items()}
        if isinstance(node, list):
            return [walk(item) for item in node]
        return node

    return OmegaConf.create(walk(OmegaConf.to_container(cfg, resolve=False)))
