"""Sample metrics during training: at validation, every `every_n_steps`, `num_samples` samples from fixed seeds with
the EMA weights, split across ranks, scored by the metric suite and logged as `val/<metric>` (`val/fd_digits`,
`val/accuracy_digits`, ...), so that `ModelCheckpoint(monitor="val/fd_digits", mode="min")` can keep the best.

The samples are those `evaluate.py` would draw with the same settings (ldm.evaluation.seeded: sample i from seed
(seed, i)); the real side is the `reference` split's features, computed once per fit. For text runs a wandb table
shows prompt -> image.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from contextlib import nullcontext

import lightning as L
import torch

from ldm.callbacks.ema import find_ema
from ldm.evaluation.seeded import CAPTION, Conditions, SamplingSettings, index_batches
from ldm.evaluation.sources import ModelSamples, score_indices
from ldm.evaluation.suites import build_run_suite, compose_metrics, dataset_metrics_option, split_captions
from ldm.metrics.reference import compute_reference
from ldm.run.guidance import resolve_guidance

log = logging.getLogger(__name__)


def own_random_stream(device: torch.device):
    """Work that must leave the run's global random streams where they were (data loaders draw a seed from them)."""
    return torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else [])


class SampleMetrics(L.Callback):
    """`metrics`: an option of conf/metrics (null: the data set's own, digits or shapes; other data sets need one);
    `sampler`, `steps`: null for the run's own sampler and `diffusion.sample_steps`; `guidance`: an option of
    conf/guidance (the run's `guidance` group), a classifier-free scale, or null for `diffusion.sample_guidance`."""

    def __init__(self, num_samples: int = 200, every_n_steps: int | None = None, batch_size: int = 250,
                 sampler=None, steps: int | None = None, guidance=None, seed: int = 0,
                 metrics: str | None = None, metrics_overrides: Sequence[str] = (), reference: str = "train",
                 prompt_table: int = 16):
        if num_samples < 2 or batch_size < 1 or (every_n_steps is not None and every_n_steps < 1):
            raise ValueError("callbacks.sample_metrics: num_samples must be at least 2, batch_size and every_n_steps "
                             f"at least 1 (or every_n_steps null), got {num_samples}, {batch_size}, {every_n_steps}")
        if reference not in ("train", "val"):
            raise ValueError(f"callbacks.sample_metrics.reference={reference}: choose train or val")
        self.num_samples, self.every_n_steps, self.batch_size = num_samples, every_n_steps, batch_size
        self.sampler, self.steps, self.guidance, self.seed = sampler, steps, guidance, seed
        self.metrics, self.metrics_overrides = metrics, list(metrics_overrides)
        self.reference, self.prompt_table = reference, prompt_table
        self.suite = self.conditions = self.guided = None
        self.seconds = 0.0  # spent here during this fit: the overhead of the in-training evaluation
        self._last_slot = -1

    def _due(self, step: int) -> bool:
        """At every validation, or at the first validation on or after each multiple of `every_n_steps`."""
        slot = step if self.every_n_steps is None else step // self.every_n_steps
        if step == 0 or slot == self._last_slot:
            return False
        self._last_slot = slot
        return True

    def _prepare(self, trainer, pl_module) -> None:
        """Build the suite, its reference and the conditions; no suite when this data set has no metrics."""
        datamodule = trainer.datamodule
        split = datamodule.train_set if self.reference == "train" else datamodule.val_set
        option = self.metrics or dataset_metrics_option(split)
        if option is None:
            log.warning("callbacks.sample_metrics: no feature network for %s; set callbacks.sample_metrics.metrics "
                        "(e.g. inception, with metrics_overrides=['metrics.weights.inception=FILE']) to score samples",
                        type(getattr(split, "base", split)).__name__)
            return
        keys = pl_module.conditioner.input_keys
        self.suite = build_run_suite(compose_metrics(option, overrides=self.metrics_overrides), keys)
        real = getattr(split, "base", split)  # a cached split holds latents: its data set has the images
        self.suite.set_reference(compute_reference(self.suite.backend.to(pl_module.device), real))
        self.suite.to(pl_module.device)
        self.guided = resolve_guidance(self.guidance, pl_module)
        self.conditions = Conditions(keys, datamodule.num_classes, split_captions(real) if CAPTION in keys else None)

    def on_fit_start(self, trainer, pl_module):
        # a wrong metrics setting stops the run before it trains, not at its first validation
        start = time.perf_counter()
        with own_random_stream(pl_module.device):
            self._prepare(trainer, pl_module)
        self.seconds += time.perf_counter() - start

    def on_validation_epoch_end(self, trainer, pl_module):
        if trainer.sanity_checking or self.suite is None or not self._due(trainer.global_step):
            return
        start = time.perf_counter()
        kept: dict = {}
        ema = find_ema(trainer)
        with ema.applied(pl_module) if ema is not None else nullcontext(), \
                trainer.precision_plugin.forward_context(), own_random_stream(pl_module.device):
            scores = self.score(pl_module, trainer.global_rank, trainer.world_size, kept)
        for name, value in scores.items():
            pl_module.log(f"val/{name}", value, sync_dist=True)  # equal on every rank: the mean changes nothing
        elapsed = time.perf_counter() - start
        self.seconds += elapsed
        pl_module.log("time/sample_metrics_seconds", elapsed, rank_zero_only=True)
        if trainer.is_global_zero and kept and CAPTION in self.conditions.input_keys:
            self._log_prompts(trainer, kept)

    def score(self, pl_module, rank: int = 0, world_size: int = 1, kept: dict | None = None) -> dict[str, float]:
        """This rank's share of the samples, drawn with the module's current weights and scored with all ranks'."""
        guidance = self.guided if self.guided is not None else resolve_guidance(self.guidance, pl_module)
        settings = SamplingSettings(self.sampler or pl_module.sampler, self.steps or pl_module.sample_steps, guidance,
                                    seed=self.seed)
        source = ModelSamples(pl_module, self.conditions, settings, self.num_samples)
        for indices in index_batches(self.num_samples, self.batch_size, rank, world_size):
            score_indices(source, self.suite, indices, kept, self.prompt_table)
        scores = self.suite.compute()  # every rank takes part, and gets the numbers of all ranks' samples
        self.suite.reset()
        return scores

    def _log_prompts(self, trainer, kept: dict) -> None:
        """A wandb table prompt -> image of the first samples (text runs)."""
        for logger in trainer.loggers:
            if hasattr(logger, "log_table"):  # WandbLogger
                import wandb  # deferred: a heavy import, only for runs that log to wandb

                rows = [[caption, wandb.Image(image[..., 0] if image.shape[-1] == 1 else image)]
                        for image, caption in (kept[i] for i in sorted(kept))]
                logger.log_table(key="val/prompts", columns=["prompt", "image"], data=rows, step=trainer.global_step)
