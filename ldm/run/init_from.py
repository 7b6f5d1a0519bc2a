"""`init_from=RUN_DIR`: a new run that starts from another run's weights (a fine-tune, or new optimizer settings).

The weights are the other run's EMA weights where it has them, its raw weights elsewhere (and before its EMA
started); the optimizer, learning-rate schedule, step and data position start afresh. The config check
(ldm/checks/other_runs.py) has made sure that the run is finished and that its model fits.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ldm.utils.checkpoint import EMA_KEY, LAST, load_checkpoint
from ldm.utils.errors import UserError


def initial_weights(run_dir: str | Path) -> tuple[dict[str, torch.Tensor], int]:
    """The other run's weights to start from (EMA over raw) and the step they were saved at."""
    checkpoint = load_checkpoint(Path(run_dir) / "checkpoints" / LAST)
    weights = dict(checkpoint["state_dict"])
    weights.update(checkpoint.get(EMA_KEY) or {})
    return weights, int(checkpoint.get("global_step", 0))


def init_from_run(module: torch.nn.Module, run_dir: str | Path) -> int:
    """Copy the other run's weights into `module` (every trainable parameter must be among them); their step."""
    weights, step = initial_weights(run_dir)
    own = module.state_dict()
    unknown = sorted(set(weights) - set(own))
    missing = sorted(name for name, p in module.named_parameters() if p.requires_grad and name not in weights)
    wrong = sorted(name for name in set(weights) & set(own) if weights[name].shape != own[name].shape)
    if unknown or missing or wrong:
        raise UserError(f"init_from={run_dir}: its weights do not fit this model (unknown: {unknown[:3]}, missing: "
                        f"{missing[:3]}, other shapes: {wrong[:3]}); use a run of the same model")
    module.load_state_dict(weights, strict=False)
    return step
