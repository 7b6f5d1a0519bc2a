"""Post-hoc EMA (EDM2, Karras et al. 2024): the power-function maths against the paper's published values and
numerical integration, the training callback on a synthetic trajectory against the paper's profile, the
reconstruction of other lengths against directly computed EMAs, and bad input refused before any work."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import ROOT, TINY, compose_config
from omegaconf import OmegaConf
from scipy.integrate import quad

from ldm.callbacks.phema import PostHocEMA
from ldm.checks.evaluation import evaluation_problems
from ldm.checks.sampling import ema_problems, sampling_problems
from ldm.checks.training import training_problems
from ldm.utils.ema_snapshots import (
    FIT_TOLERANCE,
    list_snapshots,
    reconstruct,
    reconstructed,
    snapshot_folder,
    write_reconstruction,
)
from ldm.utils.power_ema import gamma_of, inner_products, sigma_rel_of, solve_weights

TRACKED = (0.05, 0.10)


# ---- the maths ------------------------------------------------------------------------------------------------

def test_sigma_rel_and_gamma_convert_as_published():
    # EDM2 section 3: its two tracked profiles, sigma_rel 0.05 and 0.10, are gamma 16.97 and 6.94
    assert gamma_of(0.05) == pytest.approx(16.97, abs=0.005)
    assert gamma_of(0.10) == pytest.approx(6.94, abs=0.005)


@pytest.mark.parametrize("gamma", [0.05, 1.0, 6.94, 16.97, 60.0])
def test_sigma_rel_is_the_profiles_relative_standard_deviation(gamma):
    def density(x):  # the profile (gamma + 1) tau^gamma / t^(gamma + 1) at t = 1
        return (gamma + 1) * x ** gamma

    mean = quad(lambda x: x * density(x), 0, 1)[0]
    variance = quad(lambda x: (x - mean) ** 2 * density(x), 0, 1)[0]
    assert sigma_rel_of(gamma) == pytest.approx(np.sqrt(variance), rel=1e-7)
    assert gamma_of(float(sigma_rel_of(gamma))) == pytest.approx(gamma, rel=1e-7)


@pytest.mark.parametrize("t_a,gamma_a,t_b,gamma_b", [(300, 6.94, 1000, 16.97), (1000, 6.94, 300, 16.97),
                                                     (700, 3.0, 700, 30.0), (50, 16.97, 60, 16.97)])
def test_profile_inner_products_match_numerical_integration(t_a, gamma_a, t_b, gamma_b):
    def profile(tau, t, gamma):
        return (gamma + 1) * tau ** gamma / t ** (gamma + 1) if tau <= t else 0.0

    expected = quad(lambda tau: profile(tau, t_a, gamma_a) * profile(tau, t_b, gamma_b), 0, min(t_a, t_b),
                    epsabs=0, epsrel=1e-10, limit=200)[0]
    assert inner_products(t_a, gamma_a, t_b, gamma_b) == pytest.approx(expected, rel=1e-8)


def profile_weights(sigma_rel: float, steps: int) -> np.ndarray:
    """The paper's profile (gamma + 1) tau^gamma / t^(gamma + 1) integrated over each step's interval (k - 1, k]."""
    exponent = gamma_of(sigma_rel) + 1
    k = np.arange(1, steps + 1)
    return (k / steps) ** exponent - ((k - 1) / steps) ** exponent


class Trajectory:
    """A parameter vector doing a random walk, tracked by the real callback (a stand-in trainer and module)."""

    def __init__(self, folder: Path, steps: int = 1000, every: int = 60, dim: int = 2000):
        generator = torch.Generator().manual_seed(0)
        self.weights = torch.randn(steps, dim, generator=generator, dtype=torch.float64).cumsum(0)
        module = torch.nn.Module()
        module.theta = torch.nn.Parameter(torch.zeros(dim))
        module.frozen = torch.nn.Parameter(torch.zeros(3), requires_grad=False)
        callback = PostHocEMA(str(folder), sigma_rels=TRACKED, snapshot_every=every)
        trainer = SimpleNamespace(global_step=0, is_global_zero=True, max_steps=steps, fast_dev_run=False)
        for step in range(1, steps + 1):
            with torch.no_grad():
                module.theta.copy_(self.weights[step - 1])
            trainer.global_step = step
            callback.on_train_batch_end(trainer, module, None, None, step - 1)
        self.callback, self.steps = callback, steps
        self.snapshots = list_snapshots(snapshot_folder(folder))

    def ema(self, sigma_rel: float) -> torch.Tensor:
        """The EMA of this length over the whole trajectory, straight from the paper's profile."""
        return torch.from_numpy(profile_weights(sigma_rel, self.steps)) @ self.weights


@pytest.fixture(scope="module")
def walk(tmp_path_factory) -> Trajectory:
    return Trajectory(tmp_path_factory.mktemp("walk"))


def test_the_callback_tracks_the_power_function_profile(walk):
    assert [s.step for s in walk.snapshots] == [*range(60, 1000, 60), 1000]  # and one at the last step
    assert walk.snapshots[-1].sigma_rels == TRACKED
    for sigma_rel, average in zip(TRACKED, walk.callback.averages, strict=True):
        assert set(average) == {"theta"}  # trainable parameters only
        expected = walk.ema(sigma_rel)
        assert (average["theta"].double() - expected).norm() / expected.norm() < 1e-6


def test_a_tracked_length_is_reconstructed_as_itself(walk):
    for k, sigma_rel in enumerate(TRACKED):
        weights, recipe = reconstruct(walk.snapshots, sigma_rel)
        one_hot = np.zeros(len(recipe.coefficients))
        one_hot[-len(TRACKED) + k] = 1.0  # the last snapshot's profile k
        np.testing.assert_allclose(recipe.coefficients, one_hot, atol=1e-9)
        assert recipe.fit_error < 1e-6
        torch.testing.assert_close(weights["theta"], walk.callback.averages[k]["theta"], rtol=1e-6, atol=1e-4)


@pytest.mark.parametrize("sigma_rel,bound", [(0.08, 2e-3), (0.15, 5e-3), (0.03, 3e-2)])
def test_another_length_matches_a_directly_computed_ema(walk, sigma_rel, bound):
    weights, recipe = reconstruct(walk.snapshots, sigma_rel)
    expected = walk.ema(sigma_rel)
    gap = (walk.ema(TRACKED[0]) - walk.ema(TRACKED[1])).norm()  # how far apart the two tracked EMAs are
    error = float((weights["theta"].double() - expected).norm() / gap)
    print(f"sigma_rel {sigma_rel}: reconstruction error {error:.2e} of the tracked EMAs' distance, "
          f"{float((weights['theta'].double() - expected).norm() / expected.norm()):.2e} of the EMA's norm, "
          f"profile fit error {recipe.fit_error:.2e}")
    assert error < bound
    assert recipe.fit_error < FIT_TOLERANCE


def test_the_weights_sum_to_one_and_a_written_reconstruction_is_reused_while_current(walk, tmp_path):
    coefficients, _ = solve_weights([60, 60, 120, 120], [gamma_of(0.05), gamma_of(0.1)] * 2, 100, gamma_of(0.2))
    assert coefficients.sum() == pytest.approx(1.0)
    folder = tmp_path / "phema"
    for snapshot in walk.snapshots[:4]:
        (folder / snapshot.path.name).parent.mkdir(exist_ok=True)
        (folder / snapshot.path.name).write_bytes(snapshot.path.read_bytes())
    weights, recipe = reconstruct(list_snapshots(folder), 0.08)
    write_reconstruction(folder, {"theta": torch.zeros_like(weights["theta"])}, recipe)  # marked: all zeros
    assert reconstructed(folder, 0.08)[0]["theta"].abs().max() == 0  # the file, not a new reconstruction
    (folder / walk.snapshots[4].path.name).write_bytes(walk.snapshots[4].path.read_bytes())
    again, metadata = reconstructed(folder, 0.08)  # a newer snapshot: the file is out of date
    assert metadata["snapshots"] == "5" and again["theta"].abs().max() > 0


# ---- bad input: one message each, before any model is built --------------------------------------------------

@pytest.fixture(scope="module")
def runs(tmp_path_factory, walk) -> dict[str, Path]:
    """What the checks read of two runs: their configs, and one run's snapshots (the random walk's)."""
    made = {}
    for name in ("with_snapshots", "without"):
        run = tmp_path_factory.mktemp(name)
        (run / ".hydra").mkdir()
        OmegaConf.save(compose_config(TINY), run / ".hydra" / "config.yaml")
        made[name] = run
    folder = snapshot_folder(made["with_snapshots"] / "checkpoints")
    for snapshot in walk.snapshots:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / snapshot.path.name).write_bytes(snapshot.path.read_bytes())
    return made


def one_problem(problems: list[str], message: str) -> None:
    assert len(problems) == 1 and message in problems[0], problems


@pytest.mark.parametrize("check", ["sample", "evaluate"])
def test_an_ema_length_the_run_cannot_give_is_refused(runs, check):
    problems = sampling_problems if check == "sample" else evaluation_problems

    def asked(run: str, length) -> list[str]:
        return problems(compose_config([f"run={runs[run]}", f"ema_length={length}"], name=check))

    assert asked("with_snapshots", 0.08) == []
    one_problem(asked("with_snapshots", 0.5), "ema_length=0.5: give an EMA length sigma_rel in (0, 0.2887)")
    one_problem(asked("without", 0.08), "ema_length=0.08: run=")
    one_problem(asked("without", 0.08), "has no post-hoc EMA snapshots")
    one_problem(asked("with_snapshots", 0.005), "ema_length=0.005 is outside what the 17 snapshots of run=")
    assert "use ema_length in [0.0" in asked("with_snapshots", 0.005)[0]


def test_the_reconstruction_command_checks_its_length(runs):
    def asked(*arguments: str) -> list[str]:
        return ema_problems(compose_config([f"run={runs['with_snapshots']}", *arguments], name="ema"))

    assert asked("sigma_rel=0.12") == []
    one_problem(asked(), "sigma_rel: missing")
    one_problem(asked("sigma_rel=0"), "sigma_rel=0: give an EMA length sigma_rel in (0, 0.2887)")
    one_problem(asked("sigma_rel=0.28"), "sigma_rel=0.28 is outside what the 17 snapshots")


@pytest.mark.parametrize("overrides,message", [
    (["callbacks.phema.snapshot_every=0"], "callbacks.phema.snapshot_every=0 must be at least 1"),
    (["callbacks.phema.snapshot_every=10", "callbacks.phema.sigma_rels=[0.05,0.3]"],
     "callbacks.phema.sigma_rels=0.3 must be in (0, 0.288675)"),
    (["callbacks.phema.snapshot_every=10", "callbacks.phema.sigma_rels=[0.1,0.1]"],
     "callbacks.phema.sigma_rels=[0.1, 0.1]: give a list of distinct lengths"),
])
def test_training_settings_of_the_post_hoc_ema_are_checked(overrides, message):
    one_problem(training_problems(compose_config(TINY + overrides)), message)


def test_the_command_refuses_without_traceback_or_leftovers(runs, tmp_path):
    before = set(runs["with_snapshots"].rglob("*"))
    env = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "LDM_DEBUG")}
    result = subprocess.run([sys.executable, "-m", "ldm.ema", f"run={runs['with_snapshots']}", "sigma_rel=0.005"],
                            cwd=tmp_path, env=dict(env, PYTHONPATH=str(ROOT)), capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "sigma_rel=0.005 is outside what the 17 snapshots" in errors[0], result.stderr
    assert set(runs["with_snapshots"].rglob("*")) == before and not any(tmp_path.iterdir())
