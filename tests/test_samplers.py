"""Samplers against an exact model of Gaussian data, where the right answer is known."""

import hydra
import pytest
import torch
from conftest import CONF, compose_config

from ldm.samplers import Ancestral, DPMSolverPP2M, Euler, EulerAncestral, Heun
from ldm.schedules import RectifiedFlow, VPrediction
from ldm.tools.exact_gaussian import Gaussian, GaussianMixture, gaussian_problem, perfect_model
from ldm.tools.sampler_table import main
from ldm.tools.w2 import sampler_error

ALIASES = {("sampler", "ddpm")}  # old names that compose to another option; tested in test_sampler_aliases


def load(group: str) -> dict:
    """Every option of a config group, built from the composed config as train.py builds it."""
    names = [p.stem for p in sorted((CONF / group).glob("*.yaml")) if (group, p.stem) not in ALIASES]
    return {name: hydra.utils.instantiate(compose_config([f"{group}={name}"])[group]) for name in names}


SCHEDULES, SAMPLERS = load("schedule"), load("sampler")
SCHEDULES["v_ztsnr"] = VPrediction(beta_schedule="scaled_linear", zero_terminal_snr=True)
DETERMINISTIC = [name for name, s in SAMPLERS.items() if not s.stochastic]
DATA = gaussian_problem()  # 4-D, mean in [-0.6, 0.8], covariance eigenvalues 0.1 to 1.5, rotated

# Steps per sampler, and tolerances on the 2-norm of the mean error and the Frobenius norm of the
# covariance error (||S||_F = 1.9). With 20k samples the Monte-Carlo error is ~0.015 on the mean and
# ~0.04 on the covariance. Deterministic samplers add a bias below 0.04 at these steps (observed
# errors: mean <= 0.014, covariance <= 0.075). Ancestral samplers lose O(1 / steps) of the variance:
# about 10% of S at 100 steps (observed: mean <= 0.03, covariance <= 0.19, EDM being the worst),
# and under 0.05 at 400 steps (the slow test).
STEPS = {"euler": 100, "heun": 25, "dpmpp_2m": 50, "ancestral": 100, "euler_ancestral": 100}
N_SAMPLES = 20_000
MEAN_TOL = 0.05
COV_TOL = {"deterministic": 0.12, "stochastic": 0.25}


pytestmark = pytest.mark.usefixtures("one_thread")


def test_exact_posterior_means():
    g = torch.Generator().manual_seed(0)
    x_t = torch.randn(5, 4, generator=g, dtype=torch.float64)
    alpha, sigma = (
        torch.rand(5, generator=g, dtype=torch.float64),
        torch.rand(5, generator=g, dtype=torch.float64),
    )
    m, S = DATA.mean, DATA.cov
    expected = torch.stack(
        [
            m + a * S @ torch.linalg.solve(a**2 * S + s**2 * torch.eye(4), x - a * m)
            for x, a, s in zip(x_t, alpha, sigma, strict=True)
        ]
    )
    torch.testing.assert_close(DATA.posterior_mean(x_t, alpha, sigma), expected)
    # A one-component mixture is a Gaussian with covariance std^2 I.
    mixture = GaussianMixture(m[None], std=0.7, weights=torch.ones(1))
    isotropic = Gaussian(m, 0.49 * torch.eye(4, dtype=torch.float64))
    torch.testing.assert_close(
        mixture.posterior_mean(x_t, alpha, sigma), isotropic.posterior_mean(x_t, alpha, sigma)
    )


def run(sampler, p, steps, n=N_SAMPLES, seed=0, callback=None):
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(n, 4, generator=g, dtype=torch.float64)
    return sampler(perfect_model(DATA, p), noise, p, steps, generator=g, callback=callback)


def assert_reproduces_gaussian(out, mean_tol, cov_tol):
    assert torch.isfinite(out).all()
    mean_error = (out.mean(0) - DATA.mean).norm().item()
    cov_error = (torch.cov(out.T) - DATA.cov).norm().item()
    assert mean_error < mean_tol, f"mean error {mean_error:.4f}"
    assert cov_error < cov_tol, f"covariance error {cov_error:.4f}"


@pytest.mark.parametrize("p_name", SCHEDULES)
@pytest.mark.parametrize("sampler_name", SAMPLERS)
def test_reproduces_gaussian_data(sampler_name, p_name):
    sampler = SAMPLERS[sampler_name]
    out = run(sampler, SCHEDULES[p_name], STEPS[sampler_name])
    kind = "stochastic" if sampler.stochastic else "deterministic"
    assert_reproduces_gaussian(out, MEAN_TOL, COV_TOL[kind])


@pytest.mark.slow
@pytest.mark.parametrize("p_name", SCHEDULES)
@pytest.mark.parametrize("sampler", [Ancestral(), EulerAncestral(eta=0.5)], ids=["ancestral", "euler_ancestral_0.5"])
def test_ancestral_samplers_converge(sampler, p_name):
    assert_reproduces_gaussian(run(sampler, SCHEDULES[p_name], 400), MEAN_TOL, 0.1)


@pytest.mark.parametrize("p_name", SCHEDULES)
@pytest.mark.parametrize("sampler_name", DETERMINISTIC)
def test_deterministic_error_shrinks_with_steps(sampler_name, p_name):
    """Exact output law (the sampler is affine in the noise here), so no Monte-Carlo noise."""
    errors = [sampler_error(SAMPLERS[sampler_name], SCHEDULES[p_name], DATA, n) for n in (10, 20, 40)]
    assert errors[0] > errors[1] > errors[2], errors


@pytest.mark.parametrize("p_name", SCHEDULES)
def test_second_order_samplers_beat_euler(p_name):
    p = SCHEDULES[p_name]
    euler = sampler_error(Euler(), p, DATA, 10)
    assert sampler_error(DPMSolverPP2M(), p, DATA, 10) < euler
    assert sampler_error(Heun(), p, DATA, 10) < euler  # 19 calls, but it must still gain


@pytest.mark.parametrize("p_name", ["flow", "ddpm", "edm"])
def test_stochastic_error_shrinks_with_steps(p_name):
    p = SCHEDULES[p_name]
    errors = [sampler_error(Ancestral(), p, DATA, n, n_samples=N_SAMPLES) for n in (5, 25)]
    assert errors[0] > 2 * errors[1], errors


def test_euler_ancestral_spans_euler_and_ancestral():
    p = RectifiedFlow()
    torch.testing.assert_close(run(EulerAncestral(eta=0.0), p, 10, n=64), run(Euler(), p, 10, n=64))
    torch.testing.assert_close(run(EulerAncestral(eta=1.0), p, 10, n=64), run(Ancestral(), p, 10, n=64))
    assert not torch.allclose(run(EulerAncestral(eta=0.5), p, 10, n=64), run(Euler(), p, 10, n=64))


@pytest.mark.parametrize("sampler_name", SAMPLERS)
def test_calls_and_times(sampler_name):
    sampler, p = SAMPLERS[sampler_name], SCHEDULES["ddpm"]
    seen = []

    def model_fn(x, t):
        assert t.shape == (x.shape[0],) and (t == t[0]).all()
        seen.append(t[0].item())
        return torch.zeros_like(x)

    for steps in (1, 2, 7):
        seen.clear()
        sampler(model_fn, torch.randn(3, 2, 4, 4), p, steps, generator=torch.Generator().manual_seed(0))
        assert len(seen) == sampler.calls(steps)
        assert set(seen) <= set(p.timesteps(steps)[:-1].float().tolist())
        assert seen[0] == 1.0


@pytest.mark.parametrize("sampler_name", SAMPLERS)
@pytest.mark.parametrize("p_name", ["flow", "edm", "v_ztsnr"])
def test_keeps_shape_dtype_and_is_reproducible(sampler_name, p_name):
    sampler, p = SAMPLERS[sampler_name], SCHEDULES[p_name]
    model_fn = lambda x, t: p.target(0.5 * x / x.std(), x, t)  # any smooth function of x
    noise = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    outs = [sampler(model_fn, noise, p, 6, generator=torch.Generator().manual_seed(1)) for _ in range(2)]
    assert outs[0].shape == noise.shape and outs[0].dtype == torch.float32
    assert torch.isfinite(outs[0]).all()
    torch.testing.assert_close(outs[0], outs[1])


def test_error_table_prints(capsys):
    main(["--steps", "2", "--samples", "200"])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 + len(SAMPLERS) and "dpmpp_2m" in lines[-3]


@pytest.mark.parametrize("p_name", SCHEDULES)
@pytest.mark.parametrize("sampler_name", SAMPLERS)
def test_float32_sampling_stays_finite_and_on_target(sampler_name, p_name):
    """Training and sampling run in float32: the coefficient rows must hold up there too (the ends
    of the time grid, log-SNR at alpha = 0)."""
    sampler, p = SAMPLERS[sampler_name], SCHEDULES[p_name]
    data = Gaussian(DATA.mean.float(), DATA.cov.float())
    noise = torch.randn(4000, DATA.mean.shape[0], generator=torch.Generator().manual_seed(0))
    out = sampler(perfect_model(data, p), noise, p, 20, generator=torch.Generator().manual_seed(1))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert (out.mean(0) - data.mean).norm() < 0.15


def test_sampler_aliases():
    """`sampler=ddpm`, the old name of `ancestral`, composes to the same sampler."""
    old, new = compose_config(["sampler=ddpm"]).sampler, compose_config(["sampler=ancestral"]).sampler
    assert old == new and isinstance(hydra.utils.instantiate(old), Ancestral)


@pytest.mark.parametrize("p_name", ["flow", "edm", "v_ztsnr"])
@pytest.mark.parametrize("sampler_name", SAMPLERS)
def test_callback_sees_every_step(sampler_name, p_name):
    """callback({"i", "t", "x", "x0"}) once per step: the step's time, its x_t and the model's x0_hat there."""
    sampler, p, steps = SAMPLERS[sampler_name], SCHEDULES[p_name], 5
    calls, seen = [], []

    def model_fn(x, t):
        pred = perfect_model(DATA, p)(x, t)
        calls.append((x.clone(), t.clone(), pred))
        return pred

    noise = torch.randn(8, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = sampler(model_fn, noise, p, steps, generator=torch.Generator().manual_seed(1), callback=seen.append)
    times = p.timesteps(steps).double()
    assert [info["i"] for info in seen] == list(range(steps))
    for info in seen:
        i, t, x, x0 = info["i"], info["t"], info["x"], info["x0"]
        assert t.shape == (8,) and (t == times[i]).all()
        # the network call that started this step: same time, same x_t
        start = [c for c in calls if (c[1] == t).all() and torch.equal(c[0], x)]
        assert len(start) == 1, f"step {i}: no network call at its t with its x"
        torch.testing.assert_close(x0, p.to_x0_noise(x, start[0][2], t)[0])
    _, sigma_start = p.alpha_sigma(times[:1])
    torch.testing.assert_close(seen[0]["x"], sigma_start * noise)
    torch.testing.assert_close(out, seen[-1]["x0"])  # the last step lands on its x0_hat (t_next = 0)


def test_callback_is_optional_and_changes_nothing():
    p, sampler = SCHEDULES["flow"], SAMPLERS["dpmpp_2m"]
    torch.testing.assert_close(run(sampler, p, 8, n=64), run(sampler, p, 8, n=64, callback=lambda info: None))


def test_noise_is_drawn_on_the_generator_device_and_returned_where_asked():
    from ldm.utils.noise import randn

    expected = torch.randn(3, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    got = randn((3, 4), torch.Generator().manual_seed(5), device="meta", dtype=torch.float64)
    assert got.device.type == "meta" and got.dtype == torch.float64  # moved after drawing
    torch.testing.assert_close(randn((3, 4), torch.Generator().manual_seed(5), dtype=torch.float64), expected)
    assert randn((2,)).device.type == "cpu" and randn((2,), device="meta").device.type == "meta"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_cpu_generator_gives_the_same_noise_and_samples_on_cuda():
    from ldm.utils.noise import randn

    expected = torch.randn(3, 4, generator=torch.Generator().manual_seed(5))
    got = randn((3, 4), torch.Generator().manual_seed(5), device="cuda")
    assert got.device.type == "cuda"
    torch.testing.assert_close(got.cpu(), expected)
    p, noise = SCHEDULES["flow"], torch.randn(16, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    on_cpu = Ancestral()(perfect_model(DATA, p), noise, p, 5, generator=torch.Generator().manual_seed(1))
    cuda_data = Gaussian(DATA.mean.cuda(), DATA.cov.cuda())
    on_cuda = Ancestral()(perfect_model(cuda_data, p), noise.cuda(), p, 5, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(on_cuda.cpu(), on_cpu)
