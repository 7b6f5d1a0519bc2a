"""`make train` continues the newest run it started when that run stopped before its last step.

`python -m ldm.commands.unfinished [overrides ...]` prints `hydra.run.dir=DIR` for the newest run directory under
runs/ made with exactly these overrides whose last checkpoint is short of its `trainer.max_steps` (killed,
Ctrl-C, pre-empted), and says so on stderr; it prints nothing when there is none, and the run starts anew.
"""

from __future__ import annotations

import sys
from pathlib import Path

from omegaconf import OmegaConf

from ldm.utils.checkpoint import CheckpointError, newest_readable
from ldm.utils.config import ldm_root


def unfinished_run(runs: Path, overrides: list[str]) -> tuple[Path, int, int] | None:
    """(run directory, its step, its max_steps) of the newest single run under `runs` (runs/DATE/TIME) made with
    `overrides` and stopped before its last step; None when there is none."""
    # runs/DATE/TIME, by date and time: the newest last (sweeps and evaluations are deeper, and not matched)
    made = sorted(runs.glob("*/*/.hydra/overrides.yaml"), key=lambda path: path.parts[-4:-2])
    for overrides_file in reversed(made):
        run_dir = overrides_file.parent.parent
        try:
            if list(OmegaConf.load(overrides_file)) != list(overrides):
                continue
            max_steps = OmegaConf.load(run_dir / ".hydra" / "config.yaml").trainer.max_steps
            found = newest_readable(run_dir / "checkpoints")
        except (OSError, CheckpointError, ValueError, AttributeError):  # a damaged run is not continued
            continue
        if found is None:  # stopped before its first checkpoint: nothing to continue from
            continue
        step = int(found[1].get("global_step", 0))
        if isinstance(max_steps, int) and 0 < max_steps and step < max_steps:
            return run_dir, step, max_steps
        return None  # the newest such run finished: a new one starts
    return None


def main(arguments: list[str]) -> None:
    if any(argument.startswith("hydra.run.dir=") for argument in arguments):
        return  # the run directory is given
    found = unfinished_run(Path(ldm_root()) / "runs", arguments)
    if found is None:
        return
    run_dir, step, max_steps = found
    print(f"continuing {run_dir}, which stopped at step {step} of {max_steps} (make train-new starts a new run)",
          file=sys.stderr)
    print(f"hydra.run.dir={run_dir}")


if __name__ == "__main__":
    main(sys.argv[1:])
