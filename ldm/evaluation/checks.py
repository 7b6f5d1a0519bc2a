"""The arguments of `evaluate.py` checked before any model is built: one line per mistake."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ldm.checks import UNKNOWN, Findings
from ldm.errors import ConfigError
from ldm.evaluation.suites import SPLITS
from ldm.hydra_hooks import CheckConfig
from ldm.sample_checks import condition_facts, interval_problems, label_problems, prompt_problems, run_config


def evaluation_problems(cfg: DictConfig) -> list[str]:
    found = Findings(cfg)
    found.integer("n", minimum=2, hint="the number of samples to score, e.g. n=1000")
    found.integer("batch_size", minimum=1, hint="samples per forward pass, e.g. batch_size=250")
    found.integer("seed", hint="e.g. seed=0")
    found.integer("steps", minimum=1, allow_none=True, hint="sampler steps, e.g. steps=25 (null: the run's own)")
    found.number("guidance", minimum=0, allow_none=True, hint="1 is plain conditional sampling, above 1 guided "
                 "(null: the run's diffusion.sample_guidance)")
    found.number("guidance_rescale", minimum=0, maximum=1, hint="0 is no rescale, 0.7 as in Lin et al.")
    found.integer("keep", minimum=0, hint="samples kept for the grid, e.g. keep=100")
    interval_problems(found)
    for key, allowed in (("reference", SPLITS), ("real", (None, *SPLITS))):
        if found.value(key) not in allowed:
            found.add(f"{key}={found.value(key)}: choose one of {', '.join(map(str, allowed))}")
    if found.value("devices") != "auto":
        found.integer("devices", minimum=1, hint="e.g. devices=2, or auto")
    samples = found.value("samples")
    run = None if OmegaConf.is_missing(cfg, "run") else found.value("run")
    if samples is not None:
        if not str(samples).endswith(".npz") or not Path(str(samples)).expanduser().is_file():
            found.add(f"samples={samples}: no such .npz file; give a file written by sample.py (out=FILE.npz)")
        if found.value("preset") is not None:
            found.add("samples= and preset=: a sample file is scored against data, give run=DIR or reference_data=")
        if found.value("real") is not None:
            found.add("samples= and real=: give one, a sample file or a split of real images to score")
        reference_data_problems(found)
        if run is None:
            return found.problems
    run_cfg = run_config(found)
    keys, num_classes = condition_facts(run_cfg)
    label_problems(found, keys, num_classes, run_cfg)
    prompt_problems(found, keys)
    checkpoint = found.value("checkpoint")
    if checkpoint not in ("last", "best", "init", UNKNOWN) and not Path(str(checkpoint)).expanduser().is_file():
        found.add(f"checkpoint={checkpoint}: no such file; use last, best, init (untrained), or the path of a "
                  "checkpoint file")
    return found.problems


def reference_data_problems(found: Findings) -> None:
    from ldm.presets import CONF

    name = found.value("reference_data")
    options = sorted(path.stem for path in (CONF / "data").glob("*.yaml"))
    if name is not None and name not in options:
        found.add(f"reference_data={name}: no such data config; choose one of {', '.join(options)}")


def check_evaluation(cfg: DictConfig) -> None:
    if problems := evaluation_problems(cfg):
        raise ConfigError(problems)


class CheckEvaluationConfig(CheckConfig):
    """Hydra callback of evaluate.py: the arguments are checked before the output directory is made."""

    def problems(self, config: DictConfig) -> list[str]:
        return evaluation_problems(config)
