"""Time samplers and loss weights as parts: every one with every parameterization, published forms."""

import hydra
import pytest
import torch
from conftest import CONF, compose_config
from omegaconf import OmegaConf
from test_schedules import params

from ldm.schedules import (
    DDPM,
    EDM,
    EDMWeight,
    LogitNormal,
    MinSNRWeight,
    Parameterization,
    RectifiedFlow,
    SD3Weight,
    TrigFlow,
    VPrediction,
    X0Prediction,
)

TIME_SAMPLER_OPTIONS = sorted(p.stem for p in (CONF / "schedule" / "time_sampler").glob("*.yaml"))
LOSS_WEIGHT_OPTIONS = sorted(p.stem for p in (CONF / "schedule" / "loss_weight").glob("*.yaml"))
SCHEDULE_OPTIONS = sorted(p.stem for p in (CONF / "schedule").glob("*.yaml"))


def test_part_options():
    assert TIME_SAMPLER_OPTIONS == ["discrete", "logit_normal", "lognormal", "mode", "uniform"]
    assert LOSS_WEIGHT_OPTIONS == ["edm", "min_snr", "none", "sd3"]


@pytest.mark.parametrize("schedule", SCHEDULE_OPTIONS)
def test_every_time_sampler_and_loss_weight_builds_with_every_schedule(schedule):
    """Each schedule's composed config with each part's YAML in place (`schedule/time_sampler=...`)."""
    generator, base = torch.Generator().manual_seed(0), compose_config([f"schedule={schedule}"]).schedule
    for option in TIME_SAMPLER_OPTIONS:
        cfg = base.copy()
        cfg.time_sampler = OmegaConf.load(CONF / "schedule" / "time_sampler" / f"{option}.yaml")
        if option == "discrete" and "num_timesteps" not in cfg:
            cfg.time_sampler.num_timesteps = 100
        p = hydra.utils.instantiate(cfg)
        t = p.sample_t(256, generator)
        assert t.shape == (256,) and (t >= 0).all() and (t <= 1).all(), (schedule, option)
        assert type(p.time_sampler).__name__.lower() == option.replace("_", "")
    for option in LOSS_WEIGHT_OPTIONS:
        cfg = base.copy()
        cfg.loss_weight = option  # a plain name is an alias for the part with its defaults
        p = hydra.utils.instantiate(cfg)
        w = p.loss_weight(torch.linspace(0.01, 0.99, 50))
        assert w.shape == (50,) and torch.isfinite(w).all() and (w > 0).all(), (schedule, option)


def test_defaults_per_method():
    names = {k: (type(p.time_sampler).__name__, type(p.weighting).__name__) for k, p in
             {"flow": RectifiedFlow(), "ddpm": DDPM(), "edm": EDM(), "trig": TrigFlow()}.items()}
    assert names == {"flow": ("Uniform", "NoWeight"), "ddpm": ("Discrete", "NoWeight"),
                     "edm": ("LogNormal", "NoWeight"), "trig": ("Uniform", "NoWeight")}
    for name in SCHEDULE_OPTIONS:  # the YAML defaults are the Python ones
        from_yaml = hydra.utils.instantiate(compose_config([f"schedule={name}"]).schedule)
        from_python = type(from_yaml)()
        assert (from_yaml.time_sampler, from_yaml.weighting) == (from_python.time_sampler, from_python.weighting)


def test_the_commands_of_the_issue():
    edm = hydra.utils.instantiate(compose_config(["schedule=edm", "schedule/time_sampler=logit_normal"]).schedule)
    assert edm.time_sampler == LogitNormal() and isinstance(edm, EDM)
    trig = hydra.utils.instantiate(compose_config(["schedule=trig", "schedule.loss_weight=min_snr"]).schedule)
    assert trig.weighting == MinSNRWeight(gamma=5.0)
    flow = hydra.utils.instantiate(compose_config(["schedule.time_sampler=logit_normal"]).schedule)  # old spelling
    assert flow.time_sampler == LogitNormal()
    with pytest.raises(Exception, match="schedule.loss_weight must be one of none, min_snr, edm, sd3"):
        hydra.utils.instantiate(compose_config(["schedule=trig", "schedule.loss_weight=p2"]).schedule)


def test_vp_presets_inherit_from_one_base():
    """ddpm, v and x0 differ only in their target: one place changes a shared default."""
    composed = {n: OmegaConf.to_container(compose_config([f"schedule={n}"]).schedule) for n in ("ddpm", "v", "x0")}
    targets = {name: cfg.pop("_target_") for name, cfg in composed.items()}
    assert composed["ddpm"] == composed["v"] == composed["x0"] and len(set(targets.values())) == 3
    assert composed["v"]["beta_schedule"] == "linear" and composed["v"]["time_sampler"]["_target_"].endswith("Discrete")
    changed = compose_config(["schedule=x0", "schedule.beta_schedule=cosine", "schedule/loss_weight=min_snr"])
    assert hydra.utils.instantiate(changed.schedule).weighting == MinSNRWeight()


def test_old_spellings_work_in_old_run_configs_and_are_named_next_to_new_keys():
    # Run directories saved before the parts existed hold these keys and nothing newer.
    old_vp = VPrediction(loss_weighting="min_snr", min_snr_gamma=3.0)
    assert old_vp.weighting == MinSNRWeight(gamma=3.0)
    old_flow = RectifiedFlow(time_sampler="logit_normal", logit_mean=0.5, logit_std=2.0)
    assert old_flow.time_sampler == LogitNormal(0.5, 2.0)
    assert EDM(p_mean=-1.0, p_std=1.0).time_sampler.p_mean == -1.0
    for overrides, new_key in [
        (["schedule=v", "schedule.loss_weighting=min_snr"], "schedule.loss_weight=min_snr"),
        (["schedule=flow", "schedule.logit_mean=0.5"], "schedule.time_sampler.mean"),
        (["schedule=edm", "schedule.p_std=2"], "schedule.time_sampler.p_std"),
    ]:
        with pytest.raises(Exception, match=new_key):
            hydra.utils.instantiate(compose_config(overrides).schedule)


def test_discrete_time_sampler_needs_levels():
    with pytest.raises(ValueError, match="schedule.time_sampler.num_timesteps"):
        RectifiedFlow(time_sampler="discrete")
    t = DDPM(num_timesteps=10).sample_t(2000, torch.Generator().manual_seed(0))
    assert set((t * 10).round().int().tolist()) == set(range(1, 11))


def test_logit_normal_and_mode_distributions():
    g = torch.Generator().manual_seed(0)
    t = RectifiedFlow(time_sampler=LogitNormal(mean=0.5, std=2.0)).sample_t(100_000, g)
    logit = t.logit()
    assert abs(logit.mean() - 0.5) < 0.03 and abs(logit.std() - 2.0) < 0.03
    # Mode (Esser et al. 2024, eq. 20) is decreasing in u, so P(t <= f(u0)) = 1 - u0; f(0.25) = 0.75 - 0.10355 s.
    t = RectifiedFlow(time_sampler="mode").sample_t(100_000, g)
    assert abs((t <= 0.75 - 0.103553 * 1.29).float().mean() - 0.75) < 0.005
    assert abs((t <= 0.5).float().mean() - 0.5) < 0.005


@pytest.mark.parametrize("p", [EDM(), VPrediction(time_sampler="lognormal"), TrigFlow(time_sampler="lognormal")],
                         ids=["edm", "v", "trig"])
def test_lognormal_draws_edm_noise_levels_through_each_data_row(p):
    """ln(sigma / alpha) ~ N(-1.2, 1.2^2) (Karras et al. 2022, Table 1), whatever the data row."""
    t = p.sample_t(20_000, torch.Generator().manual_seed(0)).double()
    alpha, sigma = p.alpha_sigma(t)
    log_level = (sigma / alpha).log()
    inside = t < 1  # levels past the noisiest one are capped; VP's linear betas end at sigma/alpha = 157
    assert inside.float().mean() > 0.999
    assert abs(log_level[inside].mean() + 1.2) < 0.03 and abs(log_level[inside].std() - 1.2) < 0.03


def test_edm_closed_form_noise_level_map_matches_bisection():
    level = torch.logspace(-3, 1.9, 50, dtype=torch.float64)
    torch.testing.assert_close(EDM().t_of_noise_level(level), Parameterization.t_of_noise_level(EDM(), level))


def errors_after_perturbing(p, t):
    """(target-space error^2, x0 error^2, velocity error^2 of the straight path through x_t), per sample."""
    g = torch.Generator().manual_seed(0)
    x0, noise, bump = (torch.randn(len(t), 6, generator=g, dtype=torch.float64) for _ in range(3))
    x_t, target = p.noised(x0, noise, t), p.target(x0, noise, t)
    x0_hat, noise_hat = p.to_x0_noise(x_t, target + bump, t)
    velocity_error = (noise_hat - x0_hat) - (noise - x0)
    return bump.pow(2).sum(1), (x0_hat - x0).pow(2).sum(1), velocity_error.pow(2).sum(1)


@params
def test_loss_weights_are_the_published_ones_in_every_target_space(p):
    """weight * ||pred - target||^2 is the published loss on x0 (min-SNR, EDM) or on the velocity (SD3)."""
    t = torch.linspace(0.02, 0.98, 49, dtype=torch.float64)
    target_err, x0_err, velocity_err = errors_after_perturbing(p, t)
    alpha, sigma = p.alpha_sigma(t)
    snr, level, sd = alpha**2 / sigma**2, sigma / alpha, p.data_std
    min_snr = MinSNRWeight(gamma=5.0)
    # rtol: at EDM's smallest sigma the x0 error is a difference of nearly equal numbers
    close = dict(rtol=1e-4, atol=1e-12)
    torch.testing.assert_close(min_snr(t, p) * target_err, snr.clamp(max=5) * x0_err, **close)
    edm_lambda = (level**2 + sd**2) / (level * sd) ** 2
    torch.testing.assert_close(EDMWeight()(t, p) * target_err, edm_lambda * x0_err, **close)
    torch.testing.assert_close(SD3Weight()(t, p) * target_err, velocity_err, **close)


def test_edm_weight_is_one_on_edm_and_sd3_weight_is_one_on_flow():
    t = torch.linspace(0.01, 1, 100, dtype=torch.float64)
    torch.testing.assert_close(EDMWeight()(t, EDM()), torch.ones_like(t))
    torch.testing.assert_close(SD3Weight()(t, RectifiedFlow()), torch.ones_like(t))


# ---- construction: one explicit check, and the data std ---------------------------------------


def test_the_invertibility_check_runs_once_per_construction_without_a_metaclass():
    assert type(Parameterization) is type
    calls = []

    class Counting(VPrediction):
        def check_invertible(self):
            calls.append(type(self).__name__)
            super().check_invertible()

    Counting()
    assert calls == ["Counting"]


def test_data_std_is_the_std_each_method_assumes():
    assert [p.data_std for p in (RectifiedFlow(), DDPM(), VPrediction(), X0Prediction(), TrigFlow())] == [1.0] * 5
    assert EDM().data_std == 0.5 and EDM(sigma_data=1.0).data_std == 1.0


def edm_input_and_target_stds(p, data_std):
    g = torch.Generator().manual_seed(0)
    x0 = data_std * torch.randn(20_000, 4, generator=g, dtype=torch.float64)
    noise = torch.randn(20_000, 4, generator=g, dtype=torch.float64)
    stds = []
    for sigma in (0.002, 0.05, 0.2, 0.5, 1.0, 2.0, 10.0, 80.0):
        t = p.t_of_noise_level(torch.full((20_000,), sigma, dtype=torch.float64))
        x_in, _ = p.model_input(p.noised(x0, noise, t), t)
        stds += [x_in.std().item(), p.target(x0, noise, t).std().item()]
    return torch.tensor(stds)


def test_edm_input_and_target_have_unit_std_on_data_with_its_data_std():
    """EDM's preconditioning (Karras et al. 2022, sec. 5) assumes x0 of std sigma_data: latents must be scaled to it."""
    for sigma_data in (0.5, 1.0):
        p = EDM(sigma_data=sigma_data)
        assert (edm_input_and_target_stds(p, p.data_std) - 1).abs().max() < 0.02
    # The bug this guards against: latents of std 1 under sigma_data 0.5 are off by up to 2x.
    off = edm_input_and_target_stds(EDM(sigma_data=0.5), data_std=1.0)
    assert (off - 1).abs().max() > 0.5
