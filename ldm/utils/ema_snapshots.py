"""Post-hoc EMA files: snapshots of the tracked power-function averages, and weights reconstructed from them.

Both are safetensors files (data only, nothing in them runs), written atomically, in the run's
`checkpoints/phema/`:

    snapshot-0000500.safetensors  after optimizer step 500: profile k's weights as "k/<parameter name>",
                                  metadata: step and sigma_rels (profile k has sigma_rels[k])
    ema-0.08.safetensors          the weights of sigma_rel 0.08 at the last snapshot's step (`python -m ldm.ema`),
                                  metadata: sigma_rel, step, snapshots (how many were used), fit_error

The reconstruction weights come from ldm.utils.power_ema; the fit error is the relative L2 error of the
reconstructed profile, and a length whose error exceeds FIT_TOLERANCE is refused (too far from the tracked ones
for the snapshots at hand).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save

from ldm.utils.errors import UserError
from ldm.utils.files import atomic_write
from ldm.utils.power_ema import MAX_SIGMA_REL, gamma_of, solve_weights

FOLDER = "phema"  # inside the run's checkpoints/
FIT_TOLERANCE = 0.05  # the largest relative L2 error of a reconstructed profile that is accepted
_SNAPSHOT = re.compile(r"snapshot-(\d+)\.safetensors")


@dataclass(frozen=True)
class Snapshot:
    path: Path
    step: int
    sigma_rels: tuple[float, ...]


@dataclass(frozen=True)
class Reconstruction:
    """What a reconstruction is made of: one coefficient per (snapshot, profile), in snapshot then profile order."""

    sigma_rel: float
    step: int
    snapshots: int
    fit_error: float
    coefficients: np.ndarray

    def metadata(self) -> dict[str, str]:
        return {"sigma_rel": repr(self.sigma_rel), "step": str(self.step), "snapshots": str(self.snapshots),
                "fit_error": repr(self.fit_error)}


def snapshot_folder(checkpoint_dir: str | Path) -> Path:
    return Path(checkpoint_dir) / FOLDER


def write_snapshot(folder: str | Path, step: int, sigma_rels: tuple[float, ...],
                   profiles: list[dict[str, torch.Tensor]]) -> Path:
    tensors = {f"{k}/{name}": value.detach().to("cpu", torch.float32).contiguous()
               for k, profile in enumerate(profiles) for name, value in profile.items()}
    metadata = {"step": str(step), "sigma_rels": json.dumps(list(sigma_rels))}
    return _write(Path(folder) / f"snapshot-{step:07d}.safetensors", tensors, metadata)


def list_snapshots(folder: str | Path) -> list[Snapshot]:
    """The folder's snapshots by step, from their headers only; UserError for one that cannot be read."""
    found = []
    for path in sorted(Path(folder).glob("snapshot-*.safetensors")):
        if _SNAPSHOT.fullmatch(path.name) is None:
            continue
        metadata = _metadata(path)
        try:
            step, sigma_rels = int(metadata["step"]), tuple(float(s) for s in json.loads(metadata["sigma_rels"]))
        except (KeyError, ValueError, TypeError) as error:
            raise UserError(f"{path} is not a post-hoc EMA snapshot (its metadata: {metadata})") from error
        found.append(Snapshot(path, step, sigma_rels))
    return sorted(found, key=lambda snapshot: snapshot.step)


def plan(snapshots: list[Snapshot], sigma_rel: float) -> Reconstruction:
    """The coefficients of every tracked average for the EMA of `sigma_rel` at the last snapshot's step."""
    times, gammas = _tracked(snapshots)
    step = snapshots[-1].step
    coefficients, fit_error = solve_weights(times, gammas, step, gamma_of(sigma_rel))
    return Reconstruction(float(sigma_rel), step, len(snapshots), fit_error, coefficients)


def reconstructable_range(snapshots: list[Snapshot], tolerance: float = FIT_TOLERANCE) -> tuple[float, float] | None:
    """The interval of sigma_rel around the shortest tracked one that the snapshots reconstruct within `tolerance`."""
    grid = np.geomspace(1e-3, MAX_SIGMA_REL * 0.999, 120)
    times, gammas = _tracked(snapshots)
    good = solve_weights(times, gammas, snapshots[-1].step, np.array([gamma_of(s) for s in grid]))[1] <= tolerance
    tracked = min(s for snapshot in snapshots for s in snapshot.sigma_rels)
    low = high = int(np.argmin(np.abs(np.log(grid / tracked))))
    if not good[low]:
        return None
    while low > 0 and good[low - 1]:
        low -= 1
    while high < len(grid) - 1 and good[high + 1]:
        high += 1
    return float(grid[low]), float(grid[high])


def _tracked(snapshots: list[Snapshot]) -> tuple[list[int], list[float]]:
    """The time and exponent of every tracked average, in snapshot then profile order."""
    if not snapshots:
        raise UserError("no post-hoc EMA snapshots to reconstruct from")
    return ([s.step for s in snapshots for _ in s.sigma_rels],
            [gamma_of(sigma) for s in snapshots for sigma in s.sigma_rels])


def reconstruct(snapshots: list[Snapshot], sigma_rel: float) -> tuple[dict[str, torch.Tensor], Reconstruction]:
    """The weights of the EMA of `sigma_rel`: the snapshots' averages summed with `plan`'s coefficients."""
    recipe = plan(snapshots, sigma_rel)
    weights: dict[str, torch.Tensor] = {}
    pairs = iter(recipe.coefficients)
    for snapshot in snapshots:
        with safe_open(str(snapshot.path), framework="pt") as handle:
            for k in range(len(snapshot.sigma_rels)):
                coefficient = float(next(pairs))
                for key in (key for key in handle.keys() if key.startswith(f"{k}/")):
                    name, value = key[len(f"{k}/"):], handle.get_tensor(key)
                    if name in weights:
                        weights[name].add_(value, alpha=coefficient)
                    else:
                        weights[name] = value.mul_(coefficient)
    return weights, recipe


def reconstruction_path(folder: str | Path, sigma_rel: float) -> Path:
    return Path(folder) / f"ema-{sigma_rel:g}.safetensors"


def write_reconstruction(folder: str | Path, weights: dict[str, torch.Tensor], recipe: Reconstruction) -> Path:
    tensors = {name: value.contiguous() for name, value in weights.items()}
    return _write(reconstruction_path(folder, recipe.sigma_rel), tensors, recipe.metadata())


def reconstructed(folder: str | Path, sigma_rel: float) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The weights of `sigma_rel`: the file `python -m ldm.ema` wrote when it used the snapshots there are now,
    else reconstructed here; and the metadata saying how."""
    snapshots = list_snapshots(folder)
    path = reconstruction_path(folder, sigma_rel)
    if path.is_file():
        metadata = _metadata(path)
        current = {"sigma_rel": repr(float(sigma_rel)), "step": str(snapshots[-1].step) if snapshots else None,
                   "snapshots": str(len(snapshots))}
        if all(metadata.get(key) == value for key, value in current.items()):
            with safe_open(str(path), framework="pt") as handle:
                return {name: handle.get_tensor(name) for name in handle.keys()}, metadata
    weights, recipe = reconstruct(snapshots, sigma_rel)
    return weights, recipe.metadata()


def _metadata(path: Path) -> dict[str, str]:
    try:
        with safe_open(str(path), framework="pt") as handle:
            return handle.metadata() or {}
    except Exception as error:  # noqa: BLE001 - safetensors raises several kinds for a damaged file
        raise UserError(f"{path} cannot be read as a safetensors file ({error}); move it away") from error


def _write(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    data = save(tensors, metadata={"format": "pt", **metadata})
    with atomic_write(path) as handle:
        handle.write(data)
    return path
