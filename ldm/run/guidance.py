"""The `guidance` config made into a `Guidance` for a loaded module: the weaker model of autoguidance or the
classifier of classifier guidance loaded from their run directories, and checked against the module before
any sampling (the config-level checks, ldm.checks.guidance, ran before anything was built)."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

from ldm.guidance import CFG, Auto, Classifier, Guidance, as_guidance
from ldm.run.build import build_classifier_training, build_diffusion
from ldm.run.load import read_run_config, run_checkpoint
from ldm.utils.errors import UserError

log = logging.getLogger(__name__)

# latents that differ by less than this (relative) are one latent space: measured scales of runs with the same
# data, seed and batches agree exactly on a CPU, and to float rounding across devices
LATENT_TOLERANCE = 1e-4


def resolve_guidance(spec, module, run_dir: str | Path | None = None, trusted: Iterable[str] = ()) -> Guidance:
    """`spec`: a `guidance` option (CFG, Auto, Classifier), a number (a classifier-free scale), None (the run's
    `sample_guidance`) or a `Guidance` already made. `run_dir`: the module's own run, for `weak_run: null`."""
    if spec is None or isinstance(spec, (int, float, Guidance)):
        return as_guidance(spec, module.sample_guidance)
    interval = spec.noise_interval()
    if isinstance(spec, CFG):
        scale = module.sample_guidance if spec.scale is None else spec.scale
        return Guidance(scale=scale, rescale=spec.rescale, interval=interval)
    if isinstance(spec, Auto):
        weak, source = load_weak(spec, module, run_dir, trusted)
        return Guidance(scale=spec.scale, rescale=spec.rescale, interval=interval, weak=weak,
                        sources={"guidance_weak": source})
    if isinstance(spec, Classifier):
        classifier, source = load_classifier(spec, module, trusted)
        return Guidance(scale=spec.cfg_scale, rescale=spec.rescale, interval=interval, classifier=classifier,
                        classifier_scale=spec.scale, sources={"guidance_classifier": source})
    raise UserError(f"guidance: {type(spec).__name__} is not a kind of guidance; use guidance=cfg, auto or classifier")


def load_weak(spec: Auto, module, run_dir: str | Path | None, trusted: Iterable[str]):
    """The weaker model (EMA weights, as the strong one) and what it was loaded from."""
    weak_dir = Path(spec.weak_run) if spec.weak_run is not None else Path(run_dir) if run_dir is not None else None
    if weak_dir is None:
        raise UserError("guidance.weak_run: give the weaker model's run directory (here there is no run of its own "
                        "to take an earlier checkpoint from)")
    cfg = read_run_config(weak_dir, trusted, key="guidance.weak_run")
    weights = run_checkpoint(weak_dir, spec.weak_checkpoint)
    weak = build_diffusion(cfg)
    weak.load_checkpoint(weights, ema=True)
    weak = weak.to(module.device).eval()
    if problems := latent_problems(module, weak, "guidance.weak_run", weak_dir):
        raise UserError(problems)
    if weak.conditioner.input_keys != module.conditioner.input_keys:
        raise UserError(f"guidance.weak_run={weak_dir}: its model is conditioned on "
                        f"{sorted(weak.conditioner.input_keys) or 'nothing'}, this run's on "
                        f"{sorted(module.conditioner.input_keys) or 'nothing'}: the weaker model must take the same "
                        "conditions")
    step = int(weights.get("global_step", -1))
    log.info("autoguidance: the weaker model is %s (%s, step %d)", weak_dir, spec.weak_checkpoint, step)
    return weak, f"{weak_dir.resolve()}:{spec.weak_checkpoint}:step {step}"


def load_classifier(spec: Classifier, module, trusted: Iterable[str]):
    """The noise-conditional classifier of a task=classifier run and what it was loaded from."""
    if spec.classifier_run is None:
        raise UserError("guidance.classifier_run: give the run directory of a python train.py task=classifier run")
    classifier_dir = Path(spec.classifier_run)
    cfg = read_run_config(classifier_dir, trusted, task="classifier", key="guidance.classifier_run")
    classifier = build_classifier_training(cfg)
    checkpoint = run_checkpoint(classifier_dir, spec.classifier_checkpoint)
    classifier.load_checkpoint(checkpoint)
    classifier = classifier.to(module.device).eval()
    if problems := latent_problems(module, classifier, "guidance.classifier_run", classifier_dir):
        raise UserError(problems)
    return classifier, f"{classifier_dir.resolve()}:{spec.classifier_checkpoint}"


def latent_problems(module, other, key: str, other_dir: Path) -> list[str]:
    """Whether `other` reads the module's latents: same autoencoder weights, latent shape, scale and shift."""
    problems = []
    ours, theirs = module.frozen_fingerprints()["autoencoder"], other.frozen_fingerprints()["autoencoder"]
    if ours != theirs:
        problems.append(f"{key}={other_dir}: its autoencoder differs from this run's (weights hash {theirs} against "
                        f"{ours}): guidance needs models of the same latents")
    if tuple(other.latent_shape) != tuple(module.latent_shape):
        problems.append(f"{key}={other_dir}: its latents are {tuple(other.latent_shape)}, this run's "
                        f"{tuple(module.latent_shape)}: guidance needs models of the same latents")
    for name, setting in (("latent_scale", "scale_factor"), ("latent_shift", "shift_factor")):
        mine, its = float(getattr(module, name)), float(getattr(other, name))
        if abs(mine - its) > LATENT_TOLERANCE * max(abs(mine), abs(its), 1e-12):
            problems.append(f"{key}={other_dir}: its {name} {its:.6g} differs from this run's {mine:.6g} (measured "
                            f"from other batches or another schedule's data_std): train it with "
                            f"diffusion.{setting}={mine:.6g}")
    return problems
