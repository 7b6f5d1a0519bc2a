"""`evaluate.py` as one flow: the config is resolved once into an `Evaluation` (the image source, the metric
suite with its reference statistics, the run's config), then one loop scores the source through `trainer.predict`,
whichever it is: samples drawn from a run or preset, a sample file, or a split of real images."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import hydra
import lightning as L
import numpy as np
import torch
import yaml
from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from ldm.evaluation.record import log_wandb, training_group, write_metrics
from ldm.evaluation.seeded import CAPTION, Conditions, SamplingSettings, index_batches, requested_prompts
from ldm.evaluation.sources import ModelSamples, RealImages, SampleFile, score_indices
from ldm.evaluation.suites import (
    build_run_suite,
    compose_data,
    metrics_for,
    reference_dataset,
    set_reference,
    split_captions,
)
from ldm.run.build import build_diffusion, resolve_precision
from ldm.run.guidance import resolve_guidance
from ldm.run.load import (
    condition_inputs,
    load_post_hoc_ema,
    preset_sampling,
    read_run_config,
    run_checkpoint,
    sampling_config,
)
from ldm.utils.checkpoint import EMA_KEY
from ldm.utils.config import CONF
from ldm.utils.images import make_grid, save_png

log = logging.getLogger(__name__)


@dataclass
class Evaluation:
    """What one evaluation scores and against what, resolved from its config before any image is made."""

    source: ModelSamples | SampleFile | RealImages
    suite: torch.nn.Module
    run_cfg: DictConfig | None
    data_cfg: DictConfig
    provenance: dict


def resolve(cfg: DictConfig) -> Evaluation:
    """The image source `cfg` names (samples=, real=, else the run's or preset's samples), its suite and reference."""
    if cfg.samples is not None:
        source = SampleFile(cfg.samples)
        run_cfg = read_run_config(cfg.run, cfg.trusted_targets or ()) if cfg.run is not None else None
        data_cfg = run_cfg.data if run_cfg is not None else compose_data(
            cfg.reference_data or ("shapes" if source.prompts is not None else "digits"))
        suite = run_suite(cfg, data_cfg, source.keys)
        set_reference(suite, data_cfg, cfg.reference)
        provenance = {"samples": str(Path(cfg.samples).resolve()), "n": source.count,
                      "reference_split": cfg.reference, "data": OmegaConf.select(data_cfg, "train._target_"),
                      "run": str(Path(cfg.run).resolve()) if cfg.run is not None else None}
        return Evaluation(source, suite, run_cfg, data_cfg, provenance)
    run_cfg = sampling_config(cfg)
    if cfg.real is not None:
        keys = list(condition_inputs(run_cfg))
        suite = run_suite(cfg, run_cfg.data, keys)
        set_reference(suite, run_cfg.data, cfg.reference)
        dataset = reference_dataset(run_cfg.data, cfg.real)
        autoencoder = build_model(cfg, run_cfg)[0].autoencoder if cfg.get("reconstruct") else None
        source = RealImages(dataset, keys, cfg.n, autoencoder)
        provenance = {"real": cfg.real, "reconstructed": autoencoder is not None, "n": source.count,
                      "reference_split": cfg.reference, **_source(cfg, run_cfg)}
        return Evaluation(source, suite, run_cfg, run_cfg.data, provenance)
    module, checkpoint = build_model(cfg, run_cfg)
    settings = sampling_settings(cfg, module)
    keys = module.conditioner.input_keys
    suite = run_suite(cfg, run_cfg.data, keys)
    reference_set = reference_dataset(run_cfg.data, cfg.reference)
    set_reference(suite, run_cfg.data, cfg.reference, reference_set)
    captions = requested_prompts(cfg) or (split_captions(reference_set) if CAPTION in keys else None)
    conditions = Conditions(keys, run_cfg.data.get("num_classes"), captions,
                            list(cfg.labels) if cfg.labels is not None else None)
    provenance = {**settings.record(), "sampler_name": _sampler_name(settings.sampler), "n": cfg.n,
                  "batch_size": cfg.batch_size, "reference_split": cfg.reference, **_source(cfg, run_cfg),
                  **checkpoint}
    return Evaluation(ModelSamples(module, conditions, settings, cfg.n), suite, run_cfg, run_cfg.data, provenance)


class SourceScoring(L.LightningModule):
    """The scoring loop: images 0..count-1 of the source in batches, split over devices, into the suite; keeps
    the first `keep` as uint8 images (with their captions)."""

    def __init__(self, evaluation: Evaluation, batch_size: int, keep: int = 100):
        super().__init__()
        self.source, self.suite = evaluation.source, evaluation.suite
        self.model = evaluation.source.module  # moved to the device with the suite (None for a sample file)
        self.batch_size, self.keep = batch_size, keep
        self.kept: dict[int, tuple] = {}

    def predict_dataloader(self) -> DataLoader:
        batches = index_batches(self.source.count, self.batch_size, self.trainer.global_rank, self.trainer.world_size)
        return DataLoader([torch.tensor(batch) for batch in batches], batch_size=None)

    def predict_step(self, indices: torch.Tensor, batch_idx: int) -> int:
        score_indices(self.source, self.suite, indices.tolist(), self.kept, self.keep)
        if self.global_rank == 0:  # a line per batch: visible in a piped log too
            log.info("scored %d/%d (rank 0 of %d)", int(indices[-1]) + 1, self.source.count // self.trainer.world_size,
                     self.trainer.world_size)
        return len(indices)  # what the prediction loop collects; the images went into the suite


def score(cfg: DictConfig) -> dict[str, float]:
    """Resolve `cfg`, score its source in one predict loop, and write metrics.json, samples.png and the wandb run."""
    evaluation = resolve(cfg)
    task = SourceScoring(evaluation, cfg.batch_size, cfg.keep)
    # drawing runs in the configured precision; files and real images are scored as they are, in float32
    precision = resolve_precision(cfg.precision, str(cfg.accelerator)) if evaluation.source.uses_precision \
        else "32-true"
    trainer = L.Trainer(accelerator=cfg.accelerator, devices=cfg.devices, strategy=cfg.strategy, precision=precision,
                        logger=False, enable_checkpointing=False, enable_model_summary=False,
                        enable_progress_bar=False, use_distributed_sampler=False, default_root_dir=cfg.paths.output_dir)
    trainer.predict(task, return_predictions=False)
    scores = evaluation.suite.compute()  # every rank takes part: the metric states are summed / gathered over ranks
    if trainer.is_global_zero:
        provenance = {**evaluation.suite.provenance(), **evaluation.provenance, "world_size": trainer.world_size}
        kept = [task.kept[i] for i in sorted(task.kept)]
        images = np.stack([image for image, _ in kept]) if kept else None
        captions = [caption for _, caption in kept] if kept and kept[0][1] is not None else None
        finish(cfg, evaluation.run_cfg, scores, provenance, images, captions,
               per_row=evaluation.data_cfg.get("num_classes"))
    return scores


def build_model(cfg: DictConfig, run_cfg: DictConfig):
    """The module to sample from, and what it was loaded from: the checkpoint's EMA weights (raw ones before the
    EMA started), a preset's weight files, or `checkpoint=init`, the untrained weights of the run's seed."""
    if preset_sampling(cfg):
        return build_diffusion(run_cfg).eval(), {"checkpoint": None}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(run_cfg.seed)
        module = build_diffusion(run_cfg)
    if cfg.checkpoint == "init":
        return module.eval(), {"checkpoint": "init", "checkpoint_step": 0, "ema": False}
    weights = run_checkpoint(Path(cfg.run), cfg.checkpoint)
    module.load_checkpoint(weights, ema=True)
    source = {"checkpoint": cfg.checkpoint, "checkpoint_step": int(weights.get("global_step", -1)),
              "ema": bool(weights.get(EMA_KEY))}
    if cfg.get("ema_length") is not None:  # the post-hoc EMA of that length replaces the checkpoint's
        made = load_post_hoc_ema(module, Path(cfg.run), cfg.ema_length)
        source.update(ema_length=float(cfg.ema_length), ema_step=int(made["step"]),
                      ema_snapshots=int(made["snapshots"]), ema_fit_error=float(made["fit_error"]))
    return module.eval(), source


def run_suite(cfg: DictConfig, data_cfg: DictConfig, keys):
    """The suite of `metrics=` (or of the data set, with `metrics_overrides`) for a run taking conditions `keys`."""
    return build_run_suite(metrics_for(data_cfg, cfg.get("metrics"), cfg.paths.root_dir, cfg.metrics_overrides), keys)


def sampling_settings(cfg: DictConfig, module) -> SamplingSettings:
    sampler = hydra.utils.instantiate(cfg.sampler) if cfg.get("sampler") else module.sampler
    own_run = None if preset_sampling(cfg) else cfg.run
    guidance = resolve_guidance(hydra.utils.instantiate(cfg.guidance), module, own_run, cfg.trusted_targets or ())
    return SamplingSettings(sampler, cfg.steps if cfg.steps is not None else module.sample_steps, guidance,
                            int(cfg.seed))


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


def _source(cfg: DictConfig, run_cfg: DictConfig) -> dict:
    return {"run": str(Path(cfg.run).resolve()) if cfg.get("run") is not None else None, "preset": cfg.get("preset"),
            "data": OmegaConf.select(run_cfg, "data.train._target_")}


def _hydra():
    return HydraConfig.get() if HydraConfig.initialized() else None


def _sampler_name(sampler) -> str:
    """The conf/sampler option that builds this sampler's class (`heun`), else the class name."""
    for path in sorted((CONF / "sampler").glob("*.yaml")):
        target = (yaml.safe_load(path.read_text()) or {}).get("_target_")
        if target and get_class(target) is type(sampler):
            return path.stem
    return type(sampler).__name__


def _job_name() -> str | None:
    hydra_cfg = _hydra()
    return (hydra_cfg.job.override_dirname or None) if hydra_cfg is not None else None
