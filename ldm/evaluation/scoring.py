"""The three things `evaluate.py` scores: a run's samples (or a preset's), a sample file, and real images."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from ldm.evaluation.draw import CAPTION, LABEL, Conditions, SamplingSettings
from ldm.evaluation.predict import SampleEvaluation
from ldm.evaluation.record import log_wandb, training_group, write_metrics
from ldm.evaluation.suites import (
    build_run_suite,
    compose_data,
    metrics_for,
    reference_dataset,
    set_reference,
    split_captions,
)
from ldm.images import make_grid, save_png, to_uint8

log = logging.getLogger(__name__)


def score_run(cfg: DictConfig) -> dict[str, float]:
    """Samples of the run (or preset) with its EMA weights, through `trainer.predict` on `cfg.devices`."""
    from ldm.sampling import sampling_config

    run_cfg = sampling_config(cfg)
    module, checkpoint = build_model(cfg, run_cfg)
    settings = sampling_settings(cfg, module)
    keys = module.conditioner.input_keys
    suite = run_suite(cfg, run_cfg.data, keys)
    reference_set = reference_dataset(run_cfg.data, cfg.reference)
    set_reference(suite, run_cfg.data, cfg.reference, reference_set)
    conditions = Conditions(keys, run_cfg.data.get("num_classes"), _prompts(cfg) or _captions(keys, reference_set),
                            list(cfg.labels) if cfg.labels is not None else None)
    task = SampleEvaluation(module, suite, conditions, settings, cfg.n, cfg.batch_size, cfg.keep)
    trainer = L.Trainer(accelerator=cfg.accelerator, devices=cfg.devices, strategy=cfg.strategy,
                        precision=_precision(cfg.precision, cfg.accelerator), logger=False, enable_checkpointing=False,
                        enable_model_summary=False, enable_progress_bar=False, use_distributed_sampler=False,
                        default_root_dir=cfg.paths.output_dir)
    trainer.predict(task, return_predictions=False)
    scores = suite.compute()  # every rank takes part: the metric states are summed / gathered over ranks
    if trainer.is_global_zero:
        provenance = {**suite.provenance(), **settings.record(), "sampler_name": _sampler_name(settings.sampler),
                      "n": cfg.n, "batch_size": cfg.batch_size, "world_size": trainer.world_size,
                      "reference_split": cfg.reference, **_source(cfg, run_cfg), **checkpoint}
        images = task.kept_images()
        asked = conditions(list(range(len(images)))) if images is not None else {}
        finish(cfg, run_cfg, scores, provenance, images, asked.get(CAPTION), per_row=run_cfg.data.get("num_classes"))
    return scores


def score_samples_file(cfg: DictConfig) -> dict[str, float]:
    """A sample file of sample.py (images, labels or prompts) against the reference of the run or `reference_data`."""
    from ldm.sampling import run_config

    samples = np.load(cfg.samples, allow_pickle=False)
    labels = samples["labels"] if "labels" in samples.files else None
    prompts = [str(p) for p in samples["prompts"]] if "prompts" in samples.files else None
    if labels is not None and (labels < 0).any():
        labels = None  # unconditional samples (-1): nothing was asked
    run_cfg = run_config(cfg.run, cfg.trusted_targets or ()) if cfg.run is not None else None
    data_cfg = run_cfg.data if run_cfg is not None else compose_data(
        cfg.reference_data or ("shapes" if prompts is not None else "digits"))
    keys = [key for key, given in ((LABEL, labels), (CAPTION, prompts)) if given is not None]
    suite = run_suite(cfg, data_cfg, keys)
    set_reference(suite, data_cfg, cfg.reference)
    images = samples["images"]
    for start in range(0, len(images), cfg.batch_size):
        part = slice(start, start + cfg.batch_size)
        suite.update(images[part], real=False, labels=labels[part] if labels is not None else None,
                     captions=prompts[part] if prompts is not None else None)
    scores = suite.compute()
    provenance = {**suite.provenance(), "samples": str(Path(cfg.samples).resolve()), "n": len(images),
                  "reference_split": cfg.reference, "data": OmegaConf.select(data_cfg, "train._target_"),
                  "run": str(Path(cfg.run).resolve()) if cfg.run is not None else None}
    shown = images[: cfg.keep]
    finish(cfg, run_cfg, scores, provenance, shown, prompts[: cfg.keep] if prompts else None,
           per_row=data_cfg.get("num_classes"))
    return scores


def score_real(cfg: DictConfig) -> dict[str, float]:
    """The first `n` real images of split `cfg.real`, each asking for its own label or caption: the floor."""
    from ldm.sampling import condition_inputs, sampling_config

    run_cfg = sampling_config(cfg)
    keys = list(condition_inputs(run_cfg))
    suite = run_suite(cfg, run_cfg.data, keys)
    set_reference(suite, run_cfg.data, cfg.reference)
    dataset = reference_dataset(run_cfg.data, cfg.real)
    count = min(cfg.n, len(dataset))
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, range(count)), batch_size=cfg.batch_size)
    # a latent model can do no better than its autoencoder: its reconstructions of real images are its floor
    autoencoder = build_model(cfg, run_cfg)[0].autoencoder if cfg.get("reconstruct") else None
    shown = []
    for batch in loader:
        images = batch["image"]
        if autoencoder is not None:
            with torch.no_grad():
                images = autoencoder.decode(autoencoder.encode(images, sample=False)).clamp(-1, 1)
        suite.update(images, real=False, labels=batch.get(LABEL) if LABEL in keys else None,
                     captions=batch.get(CAPTION) if CAPTION in keys else None)
        shown.append(to_uint8(images[: cfg.keep - sum(map(len, shown))]))
    scores = suite.compute()
    provenance = {**suite.provenance(), "real": cfg.real, "reconstructed": autoencoder is not None, "n": count,
                  "reference_split": cfg.reference, **_source(cfg, run_cfg)}
    finish(cfg, run_cfg, scores, provenance, np.concatenate(shown), None, per_row=run_cfg.data.get("num_classes"))
    return scores


def build_model(cfg: DictConfig, run_cfg: DictConfig):
    """The module to sample from, and what it was loaded from: the checkpoint's EMA weights (raw ones before the
    EMA started), a preset's weight files, or `checkpoint=init`, the untrained weights of the run's seed."""
    from ldm.build import build_diffusion
    from ldm.callbacks.ema import CHECKPOINT_KEY
    from ldm.sampling import preset_sampling, run_checkpoint

    if preset_sampling(cfg):
        return build_diffusion(run_cfg).eval(), {"checkpoint": None}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(run_cfg.seed)
        module = build_diffusion(run_cfg)
    if cfg.checkpoint == "init":
        return module.eval(), {"checkpoint": "init", "checkpoint_step": 0, "ema": False}
    weights = run_checkpoint(Path(cfg.run), cfg.checkpoint)
    module.load_checkpoint(weights, ema=True)
    return module.eval(), {"checkpoint": cfg.checkpoint, "checkpoint_step": int(weights.get("global_step", -1)),
                           "ema": bool(weights.get(CHECKPOINT_KEY))}


def run_suite(cfg: DictConfig, data_cfg: DictConfig, keys):
    """The suite of `metrics=` (or of the data set, with `metrics_overrides`) for a run taking conditions `keys`."""
    return build_run_suite(metrics_for(data_cfg, cfg.get("metrics"), cfg.paths.root_dir, cfg.metrics_overrides), keys)


def sampling_settings(cfg: DictConfig, module) -> SamplingSettings:
    import hydra

    sampler = hydra.utils.instantiate(cfg.sampler) if cfg.get("sampler") else module.sampler
    return SamplingSettings(sampler, cfg.steps if cfg.steps is not None else module.sample_steps,
                            float(cfg.guidance if cfg.guidance is not None else module.sample_guidance),
                            float(cfg.guidance_rescale),
                            list(cfg.guidance_interval) if cfg.guidance_interval is not None else None, int(cfg.seed))


def finish(cfg: DictConfig, run_cfg: DictConfig | None, scores: dict, provenance: dict, images: np.ndarray | None,
           prompts: list[str] | None, per_row: int | None) -> None:
    """metrics.json, samples.png and the wandb run, in the output directory."""
    out_dir = Path(cfg.paths.output_dir)
    grid = None
    if images is not None and len(images):
        grid = save_png(make_grid(images, per_row or 10), out_dir / "samples.png", upscale=2)
    run_dir = Path(cfg.run) if cfg.get("run") is not None else None
    group = cfg.wandb.group or training_group(run_dir, run_cfg)
    path = write_metrics(out_dir, scores, {**provenance, "wandb_group": group})
    log.info("%s", "  ".join(f"{name} {value:.4g}" for name, value in scores.items()))
    log.info("wrote %s", path)
    log_wandb(cfg.wandb, out_dir, group, _job_name(), scores, provenance, grid, prompts,
              images if prompts is not None else None)


def _prompts(cfg: DictConfig) -> list[str] | None:
    if cfg.prompts_file:
        return [line.strip() for line in Path(cfg.prompts_file).read_text().splitlines() if line.strip()]
    return list(cfg.prompts) if cfg.prompts is not None else None


def _captions(keys, reference_set) -> list[str] | None:
    return split_captions(reference_set) if CAPTION in keys else None


def _source(cfg: DictConfig, run_cfg: DictConfig) -> dict:
    return {"run": str(Path(cfg.run).resolve()) if cfg.get("run") is not None else None, "preset": cfg.get("preset"),
            "data": OmegaConf.select(run_cfg, "data.train._target_")}


def _precision(precision, accelerator):
    from ldm.build import resolve_precision

    return resolve_precision(precision, str(accelerator))


def _hydra():
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get() if HydraConfig.initialized() else None


def _sampler_name(sampler) -> str:
    """The conf/sampler option that builds this sampler's class (`heun`), else the class name."""
    import yaml
    from hydra.utils import get_class

    from ldm.presets import CONF

    for path in sorted((CONF / "sampler").glob("*.yaml")):
        target = (yaml.safe_load(path.read_text()) or {}).get("_target_")
        if target and get_class(target) is type(sampler):
            return path.stem
    return type(sampler).__name__


def _job_name() -> str | None:
    hydra_cfg = _hydra()
    return (hydra_cfg.job.override_dirname or None) if hydra_cfg is not None else None
