"""The newest run that evaluation with its defaults can score, for tools that are given no run directory."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from ldm.evaluation.suites import metrics_option
from ldm.run.renamed import with_current_targets
from ldm.utils.checkpoint import LAST


def newest_evaluable_run(runs: str | Path) -> Path | None:
    """The run under `runs` (single runs and sweep jobs) with the newest last.ckpt among those that can be scored
    without further settings: diffusion runs on a data set with metrics of its own (digits, shapes). An
    autoencoder run, a run on other data (which needs metrics=...) or one without a checkpoint is passed over."""
    found = []
    for pattern in ("*/*", "multirun/*/*/*"):  # runs/DATE/TIME, runs/multirun/DATE/TIME/JOB
        for last in Path(runs).glob(f"{pattern}/checkpoints/{LAST}"):
            run_dir = last.parent.parent
            try:
                cfg = with_current_targets(OmegaConf.load(run_dir / ".hydra" / "config.yaml"))
            except Exception:  # noqa: BLE001 - no config, or a damaged one: not a run to score
                continue
            data = cfg.get("data")
            if cfg.get("task", "diffusion") == "diffusion" and data is not None and metrics_option(data) is not None:
                found.append((last.stat().st_mtime_ns, str(run_dir)))
    return Path(max(found)[1]) if found else None
