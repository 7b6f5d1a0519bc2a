"""The arguments of `evaluate.py` checked before any model is built: one line per mistake."""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from ldm.checks.findings import Findings
from ldm.checks.hardware import accelerator_problems, strategy_name_problems
from ldm.checks.ranges import range_problems
from ldm.checks.sampling import argument_problems, checkpoint_problems, post_hoc_ema_problems, run_problems
from ldm.evaluation.suites import SPLITS
from ldm.run.build import uses_gpu
from ldm.utils.config import CONF
from ldm.utils.errors import ConfigError


def evaluation_problems(cfg: DictConfig) -> list[str]:
    found = Findings(cfg)
    range_problems(found, built_by_code={})
    argument_problems(found, n_minimum=2, n_hint="the number of samples to score, e.g. n=1000")
    found.integer("keep", minimum=0, hint="samples kept for the grid, e.g. keep=100")
    for key, allowed in (("reference", SPLITS), ("real", (None, *SPLITS))):
        if found.value(key) not in allowed:
            found.add(f"{key}={found.value(key)}: choose one of {', '.join(map(str, allowed))}")
    if found.value("reconstruct") not in (False, None) and found.value("real") is None:
        found.add("reconstruct=true scores reconstructions of real images: give the split too, e.g. real=val")
    if found.value("devices") != "auto":
        found.integer("devices", minimum=1, hint="e.g. devices=2, or auto")
    accelerator_problems(found, prefix="")
    strategy_name_problems(found, prefix="")
    samples = found.value("samples")
    run = None if OmegaConf.is_missing(cfg, "run") else found.value("run")
    if samples is not None:
        if not str(samples).endswith(".npz") or not Path(str(samples)).expanduser().is_file():
            found.add(f"samples={samples}: no such .npz file; give a file written by sample.py (out=FILE.npz)")
        if found.value("preset") is not None:
            found.add("samples= and preset=: a sample file is scored against data, give run=DIR or reference_data=")
        if found.value("real") is not None:
            found.add("samples= and real=: give one, a sample file or a split of real images to score")
        if found.value("ema_length") is not None:
            found.add("samples= and ema_length=: a sample file is scored as it is; drop ema_length=")
        reference_data_problems(found)
        if run is None:
            return found.problems
    run_problems(found, "evaluate.py")
    checkpoint_problems(found, ("last", "best", "init"))
    if found.value("real") is not None and found.value("ema_length") is not None:
        found.add("real= and ema_length=: real images use no denoiser weights; drop ema_length=")
    else:
        post_hoc_ema_problems(found)
    return found.problems


def reference_data_problems(found: Findings) -> None:
    name = found.value("reference_data")
    options = sorted(path.stem for path in (CONF / "data").glob("*.yaml"))
    if name is not None and name not in options:
        found.add(f"reference_data={name}: no such data config; choose one of {', '.join(options)}")


def check_evaluation(cfg: DictConfig) -> None:
    if problems := evaluation_problems(cfg):
        raise ConfigError(problems)


def device_count(cfg: DictConfig) -> int:
    """How many devices the predict loop would use (devices=auto: every visible GPU, else one)."""
    devices = cfg.get("devices")
    if devices != "auto":
        return devices if isinstance(devices, int) else len(devices) if isinstance(devices, list | tuple) else 1
    return max(torch.cuda.device_count(), 1) if uses_gpu(str(cfg.get("accelerator"))) else 1
