"""Post-hoc EMA settings: the tracked lengths of a training run, and a length asked of a run's snapshots.

A length (`ema_length=` of sample.py and evaluate.py, `sigma_rel=` of `python -m ldm.ema`) is checked against the
run's snapshots before any model is built: the run must have some, and they must reconstruct that length's
profile within ldm.utils.ema_snapshots.FIT_TOLERANCE; the message gives the range they do reconstruct.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from ldm.checks.findings import UNKNOWN, Findings, is_number
from ldm.utils.ema_snapshots import FIT_TOLERANCE, list_snapshots, plan, reconstructable_range, snapshot_folder
from ldm.utils.errors import UserError
from ldm.utils.power_ema import MAX_SIGMA_REL

POST_HOC_EMA = "ldm.callbacks.phema.PostHocEMA"


def power_ema_switched_off(found: Findings, name: str) -> bool:
    """Whether callbacks.<name> is a post-hoc EMA that keeps no snapshots (snapshot_every: null)."""
    return found.value(f"callbacks.{name}._target_") == POST_HOC_EMA \
        and found.value(f"callbacks.{name}.snapshot_every") is None


def power_ema_problems(found: Findings) -> None:
    """The tracked lengths of a training run's post-hoc EMA: at least one, none twice (ranges.py checks each)."""
    callbacks = found.node("callbacks")
    for name in callbacks.keys() if OmegaConf.is_dict(callbacks) else ():
        if found.value(f"callbacks.{name}._target_") != POST_HOC_EMA or power_ema_switched_off(found, name):
            continue
        key = f"callbacks.{name}.sigma_rels"
        sigma_rels = found.value(key)
        if sigma_rels is UNKNOWN:
            continue
        if not isinstance(sigma_rels, list) or not sigma_rels or len(set(sigma_rels)) != len(sigma_rels):
            found.add(f"{key}={sigma_rels}: give a list of distinct lengths, e.g. {key}=[0.05,0.10]", key=key)


def ema_length_problems(found: Findings, key: str, run: str | None) -> None:
    """`key` (a sigma_rel) is in range and the snapshots of `run` reconstruct it; nothing to check when unset."""
    value = found.value(key)
    if value is None or value is UNKNOWN:
        return
    if not is_number(value) or not 0 < value < MAX_SIGMA_REL:
        found.add(f"{key}={value}: give an EMA length sigma_rel in (0, {MAX_SIGMA_REL:.4f}) (its standard deviation "
                  f"relative to the training time), e.g. {key}=0.08", key=key)
        return
    if run is None:
        found.add(f"{key}={value}: a post-hoc EMA is reconstructed from a training run's snapshots: give run=DIR",
                  key=key)
        return
    if not Path(str(run)).expanduser().is_dir():
        return  # the run check says what is wrong with run=
    folder = snapshot_folder(Path(str(run)).expanduser() / "checkpoints")
    try:
        snapshots = list_snapshots(folder)
    except UserError as error:
        found.add(f"{key}={value}: {error}", key=key)
        return
    if not snapshots:
        found.add(f"{key}={value}: run={run} has no post-hoc EMA snapshots ({folder}/snapshot-*.safetensors): they "
                  "are kept by training with callbacks.phema.snapshot_every=N; without "
                  f"{key}= the run's own EMA is used", key=key)
        return
    fit_error = plan(snapshots, value).fit_error
    if fit_error > FIT_TOLERANCE:
        span = reconstructable_range(snapshots)
        within = f"use {key} in [{span[0]:.3f}, {span[1]:.3f}]" if span else "train with more snapshots"
        found.add(f"{key}={value} is outside what the {len(snapshots)} snapshots of run={run} (steps "
                  f"{snapshots[0].step}..{snapshots[-1].step}, tracked lengths {list(snapshots[-1].sigma_rels)}) "
                  f"reconstruct: its EMA profile would be off by {fit_error:.0%} (relative L2 error, at most "
                  f"{FIT_TOLERANCE:.0%}); {within}", key=key)
