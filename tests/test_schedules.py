"""Parameterizations: published values, the two-row identity, and the contract."""

import hydra
import pytest
import torch
from conftest import CONF, compose_config

from ldm.schedules import (
    DDPM,
    EDM,
    LogitNormal,
    MinSNRWeight,
    Parameterization,
    RectifiedFlow,
    TrigFlow,
    VPrediction,
    X0Prediction,
    alphas_cumprod,
    shift_time,
)

# Every method, the VP data rows with each beta schedule and zero terminal SNR, and some parts.
PARAMETERIZATIONS = {
    "flow": RectifiedFlow(),
    "flow_shift3_logit": RectifiedFlow(shift=3.0, time_sampler=LogitNormal()),
    "flow_mode_sd3": RectifiedFlow(time_sampler="mode", loss_weight="sd3"),
    "ddpm_linear": DDPM(),
    "ddpm_scaled_linear": DDPM(beta_schedule="scaled_linear"),
    "ddpm_cosine": DDPM(beta_schedule="cosine", loss_weight=MinSNRWeight()),
    "v": VPrediction(),
    "v_cosine": VPrediction(beta_schedule="cosine"),
    "v_ztsnr": VPrediction(beta_schedule="scaled_linear", zero_terminal_snr=True),
    "v_lognormal_edm": VPrediction(time_sampler="lognormal", loss_weight="edm"),
    "x0": X0Prediction(loss_weight="min_snr"),
    "x0_ztsnr": X0Prediction(zero_terminal_snr=True),
    "edm": EDM(),
    "edm_logit_sd3": EDM(time_sampler="logit_normal", loss_weight="sd3"),
    "trig": TrigFlow(),
    "trig_min_snr": TrigFlow(loss_weight="min_snr"),
}
params = pytest.mark.parametrize("p", PARAMETERIZATIONS.values(), ids=PARAMETERIZATIONS.keys())


# ---- published values ---------------------------------------------------------------------------


def test_linear_alphas_cumprod():
    table = alphas_cumprod("linear")
    assert table[0].item() == pytest.approx(0.9999, rel=1e-9)
    assert table[999].item() == pytest.approx(4.0358e-5, rel=1e-4)


def test_scaled_linear_and_cosine_alphas_cumprod():
    assert alphas_cumprod("scaled_linear")[999].item() == pytest.approx(0.0046601, rel=1e-4)
    assert alphas_cumprod("cosine")[499].item() == pytest.approx(0.49384, rel=1e-4)


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "cosine"])
def test_zero_terminal_snr(schedule):
    rescaled, original = alphas_cumprod(schedule, zero_terminal_snr=True), alphas_cumprod(schedule)
    assert rescaled[999].item() == 0
    assert rescaled[0].item() == pytest.approx(original[0].item(), rel=1e-12)
    assert (rescaled[1:] < rescaled[:-1]).all()


def test_karras_sigmas():
    p = EDM()
    sigmas = p.sigma(p.timesteps(18))
    assert sigmas.shape == (19,)
    expected = torch.tensor([80, 57.58598, 40.78557, 28.37458], dtype=torch.float64)
    torch.testing.assert_close(sigmas[:4], expected, rtol=1e-6, atol=0)
    assert sigmas[-2].item() == pytest.approx(0.002, rel=1e-12)
    assert sigmas[-1].item() == 0


def test_edm_preconditioning_closed_forms():
    p, sd = EDM(), 0.5
    sigma = torch.tensor([0.002, 0.1, 0.5, 1.0, 80.0], dtype=torch.float64)
    c_skip, c_out, c_in, c_noise = p.preconditioning(sigma)
    torch.testing.assert_close(c_skip, sd**2 / (sigma**2 + sd**2))
    torch.testing.assert_close(c_out, sigma * sd / (sigma**2 + sd**2).sqrt())
    torch.testing.assert_close(c_in, 1 / (sigma**2 + sd**2).sqrt())
    torch.testing.assert_close(c_noise, sigma.log() / 4)
    # At sigma = sigma_data: c_skip = 1/2, c_out = sd / sqrt 2, c_in = 1 / (sd sqrt 2).
    assert c_skip[2].item() == pytest.approx(0.5)
    assert c_out[2].item() == pytest.approx(0.5 / 2**0.5)


def test_edm_target_input_and_loss_weight_match_the_paper():
    p, g = EDM(), torch.Generator().manual_seed(0)
    x0, noise, net = (torch.randn(16, 3, generator=g, dtype=torch.float64) for _ in range(3))
    t = torch.rand(16, generator=g, dtype=torch.float64) * 0.99 + 0.01
    sigma = p.sigma(t)
    c_skip, c_out, c_in, c_noise = (c[:, None] for c in p.preconditioning(sigma))
    x_t = x0 + sigma[:, None] * noise
    torch.testing.assert_close(p.target(x0, noise, t), (x0 - c_skip * x_t) / c_out)
    torch.testing.assert_close(p.to_x0_noise(x_t, net, t)[0], c_skip * x_t + c_out * net)
    x_in, t_in = p.model_input(x_t, t)
    torch.testing.assert_close(x_in, c_in * x_t)
    torch.testing.assert_close(t_in, c_noise[:, 0])
    # EDM's loss: lambda(sigma) ||D - x0||^2 with lambda = (sigma^2 + sd^2) / (sigma sd)^2.
    denoised = c_skip * x_t + c_out * net
    edm_loss = (sigma**2 + 0.25) / (sigma * 0.5) ** 2 * ((denoised - x0) ** 2).sum(1)
    ours = p.loss_weight(t) * ((net - p.target(x0, noise, t)) ** 2).sum(1)
    torch.testing.assert_close(ours, edm_loss)


def test_flow_shift():
    t = torch.tensor(0.001, dtype=torch.float64)
    assert shift_time(t, 3.0).item() == pytest.approx(0.0029940, rel=1e-4)
    p = RectifiedFlow(shift=3.0)
    torch.testing.assert_close(p.timesteps(8), shift_time(torch.linspace(1, 0, 9, dtype=torch.float64), 3.0))
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    torch.testing.assert_close(p.sample_t(64, g1), shift_time(RectifiedFlow().sample_t(64, g2), 3.0))


def test_min_snr_matches_hang_et_al_per_target():
    t = torch.linspace(0.01, 1, 100, dtype=torch.float64)
    alpha, sigma = DDPM().alpha_sigma(t)
    snr, clipped = alpha**2 / sigma**2, (alpha**2 / sigma**2).clamp(max=5)
    kw = dict(loss_weight=MinSNRWeight(gamma=5))
    torch.testing.assert_close(DDPM(**kw).loss_weight(t), clipped / snr)
    torch.testing.assert_close(VPrediction(**kw).loss_weight(t), clipped / (snr + 1))
    torch.testing.assert_close(X0Prediction(**kw).loss_weight(t), clipped)
    torch.testing.assert_close(DDPM().loss_weight(t), torch.ones_like(t))


# ---- the discrete VP grid -----------------------------------------------------------------------


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "cosine"])
@pytest.mark.parametrize("ztsnr", [False, True])
def test_vp_alpha_matches_alphas_cumprod_at_every_level(schedule, ztsnr):
    p = VPrediction(beta_schedule=schedule, zero_terminal_snr=ztsnr)
    t = torch.arange(1, 1001, dtype=torch.float64) / 1000
    alpha, sigma = p.alpha_sigma(t)
    torch.testing.assert_close(alpha**2, alphas_cumprod(schedule, 1000, ztsnr), rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(alpha**2 + sigma**2, torch.ones_like(t))
    # Continuous in between, monotone, and clean data at t = 0.
    fine = torch.linspace(0, 1, 4001, dtype=torch.float64)
    alpha_fine, sigma_fine = p.alpha_sigma(fine)
    assert (alpha_fine[1:] <= alpha_fine[:-1]).all() and (sigma_fine[1:] >= sigma_fine[:-1]).all()
    assert alpha_fine[0].item() == 1 and sigma_fine[0].item() == 0


def test_vp_timesteps_are_evenly_spaced_levels():
    expected = torch.tensor([1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0], dtype=torch.float64)
    torch.testing.assert_close(DDPM().timesteps(10), expected)
    levels = DDPM().timesteps(7)[:-1] * 1000
    torch.testing.assert_close(levels, levels.round())
    with pytest.raises(ValueError, match="num_timesteps"):
        DDPM().timesteps(1001)


def test_vp_sample_t_draws_levels():
    t = DDPM().sample_t(512, torch.Generator().manual_seed(0))
    assert (t > 0).all() and (t <= 1).all()
    torch.testing.assert_close(t * 1000, (t * 1000).round())


# ---- the contract, for every parameterization ---------------------------------------------------


@params
def test_step_reproduces_the_data_row(p):
    """step(x_t, target, t, t_next) == alpha(t_next) x0 + sigma(t_next) noise, down to t_next = 0."""
    g = torch.Generator().manual_seed(0)
    batch = 256
    x0 = torch.randn(batch, 3, 2, generator=g, dtype=torch.float64)
    noise = torch.randn(batch, 3, 2, generator=g, dtype=torch.float64)
    t = torch.rand(batch, generator=g, dtype=torch.float64).clamp(min=1e-3)
    t[:8] = 1.0
    t_next = t * torch.rand(batch, generator=g, dtype=torch.float64)
    t_next[::4] = 0.0
    alpha, sigma = (c[:, None, None] for c in p.alpha_sigma(t))
    alpha_next, sigma_next = (c[:, None, None] for c in p.alpha_sigma(t_next))
    x_t = alpha * x0 + sigma * noise
    x_next = p.step(x_t, p.target(x0, noise, t), t, t_next)
    torch.testing.assert_close(x_next, alpha_next * x0 + sigma_next * noise, rtol=1e-9, atol=1e-9)


@params
def test_to_x0_noise_inverts_the_rows(p):
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(64, 5, generator=g, dtype=torch.float64), torch.randn(64, 5, generator=g).double()
    t = torch.linspace(0.01, 1, 64, dtype=torch.float64)
    x0_hat, noise_hat = p.to_x0_noise(p.noised(x0, noise, t), p.target(x0, noise, t), t)
    torch.testing.assert_close(x0_hat, x0, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(noise_hat, noise, rtol=1e-8, atol=1e-8)


@params
def test_timesteps(p):
    for n in (1, 2, 10, 50):
        t = p.timesteps(n)
        assert t.shape == (n + 1,)
        assert (t[1:] < t[:-1]).all()
        assert t[0].item() == pytest.approx(1.0) and t[-1].item() == 0.0


@params
def test_sample_t_is_reproducible_and_in_range(p):
    a = p.sample_t(1000, torch.Generator().manual_seed(7))
    b = p.sample_t(1000, torch.Generator().manual_seed(7))
    torch.testing.assert_close(a, b)
    assert a.shape == (1000,) and (a >= 0).all() and (a <= 1).all()
    assert not torch.equal(a, p.sample_t(1000, torch.Generator().manual_seed(8)))


@params
def test_dtype_shape_and_model_input(p):
    t = p.sample_t(6, torch.Generator().manual_seed(0)).clamp(min=0.05)
    x = torch.randn(6, 4, 8, 8)
    alpha, sigma = p.alpha_sigma(t)
    assert alpha.shape == sigma.shape == (6,) and alpha.dtype == torch.float32
    assert p.loss_weight(t).shape == (6,)
    assert p.target(x, x, t).dtype == torch.float32
    assert p.step(x, x, t, t / 2).shape == x.shape
    x_in, t_in = p.model_input(x, t)
    assert x_in.shape == x.shape and t_in.shape == (6,)
    if not isinstance(p, EDM):
        assert x_in is x and t_in is t


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@params
def test_runs_on_cuda(p):
    t = torch.rand(4, device="cuda").clamp(min=0.05)
    x = torch.randn(4, 3, device="cuda")
    assert p.step(x, x, t, t / 2).device.type == "cuda"
    assert p.loss_weight(t).device.type == "cuda"


# ---- construction ------------------------------------------------------------------------------


def test_non_invertible_parameterization_refuses_to_build():
    class TargetIsXt(TrigFlow):
        def model_row(self, t):
            return self.alpha_sigma(t)

    with pytest.raises(ValueError, match="not invertible"):
        TargetIsXt()


def test_noise_target_with_zero_terminal_snr_refuses_to_build():
    with pytest.raises(ValueError, match="t=1"):
        DDPM(zero_terminal_snr=True)


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="beta_schedule"):
        DDPM(beta_schedule="quadratic")
    with pytest.raises(ValueError, match="schedule.loss_weight must be one of none, min_snr, edm, sd3.*'p2'"):
        VPrediction(loss_weight="p2")
    with pytest.raises(ValueError, match="schedule.time_sampler must be one of uniform, .*'cosmap'"):
        RectifiedFlow(time_sampler="cosmap")


@pytest.mark.parametrize("path", sorted((CONF / "schedule").glob("*.yaml")), ids=lambda p: p.stem)
def test_schedule_configs_instantiate(path):
    p = hydra.utils.instantiate(compose_config([f"schedule={path.stem}"]).schedule)
    assert isinstance(p, Parameterization)
    assert p.timesteps(4)[-1].item() == 0


@pytest.mark.parametrize("path", sorted((CONF / "sampler").glob("*.yaml")), ids=lambda p: p.stem)
def test_sampler_configs_instantiate(path):
    sampler = hydra.utils.instantiate(compose_config([f"sampler={path.stem}"]).sampler)
    assert callable(sampler) and sampler.calls(10) >= 10


def test_all_config_options_exist():
    schedules = {p.stem for p in (CONF / "schedule").glob("*.yaml")}
    samplers = {p.stem for p in (CONF / "sampler").glob("*.yaml")}
    assert schedules == {"flow", "ddpm", "v", "x0", "edm", "trig"}  # the VP base is not an option
    assert {"euler", "ancestral", "ddpm", "euler_ancestral", "heun", "dpmpp_2m"} <= samplers


# ---- time samplers and loss weights: parts any parameterization takes ---------------------------
