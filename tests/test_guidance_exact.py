"""Guidance against exact models of Gaussian data, where the law it must sample is known (as test_samplers.py).

The classes are the two components of a Gaussian mixture in 2-D. The exact denoisers of the mixture and of each
component, and the exact noise-conditional classifier p(y | x_t), are in closed form (ldm.tools.exact_gaussian),
and the guidance under test is the one the commands use (`Guidance.model_fn` on a stand-in for the module). What
theory says it samples:

- Classifier guidance with scale s gives the score of p_t(x | y)^s p_t(x)^(1-s) at every noise level t: checked
  at points against the gradient of that density taken numerically. With s = 1 that is p_t(x | y) (Bayes), so the
  samples follow the tilted law p(x | y)^s p(x)^(1 - s) = p(x | y) exactly: checked for every sampler and
  parameterization. (For s != 1 and a mixture the tilt of the noised laws is not the noised tilt, and the samples
  do not follow p(x|y)^s p(x)^(1-s); where the two laws are Gaussians of one covariance they do, below.)
- CFG and autoguidance, reference + w (strong - reference): for Gaussians of one covariance the tilt commutes with
  the noise, so they sample p_strong^w p_reference^(1-w) = N(w m_strong + (1 - w) m_reference, S) for any w; on
  the mixture, w = 0 and 1 give the reference's and the strong model's laws.
- Guidance limited to noise levels (sigma_lo, sigma_hi] in sigma / alpha: for Gaussians of one isotropic variance
  v the probability-flow ODE gives the final mean in closed form, sqrt(v) * integral of m(sigma) sigma /
  (v + sigma^2)^(3/2) d sigma, the same for every parameterization.

Reference laws are computed numerically on a grid from the densities, not from the formulas above.
"""

from __future__ import annotations

import math

import pytest
import torch
from test_samplers import SAMPLERS, SCHEDULES, STEPS

from ldm.contracts.conditioning import Conditioning
from ldm.guidance import Guidance, NoiseInterval, noise_level
from ldm.tools.exact_gaussian import Gaussian, GaussianMixture, perfect_model

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = dict(dtype=torch.float64)
MIXTURE = GaussianMixture(torch.tensor([[-1.0, 0.0], [1.0, 0.5]], **F64), std=0.5,
                          weights=torch.tensor([0.3, 0.7], **F64))
LABEL = 0  # the smaller class: guidance towards it moves the law the most
COV = torch.tensor([[0.3, 0.1], [0.1, 0.2]], **F64)
STRONG, REFERENCE = Gaussian(torch.tensor([0.5, -0.2], **F64), COV), Gaussian(torch.tensor([-0.3, 0.4], **F64), COV)
N = 8000
# every parameterization with one sampler each, the samplers in turn (all five appear); the full product is slow
PAIRS = [(p_name, list(SAMPLERS)[i % len(SAMPLERS)]) for i, p_name in enumerate(SCHEDULES)]
ALL_PAIRS = [(p_name, sampler_name) for p_name in SCHEDULES for sampler_name in SAMPLERS]
MATRIX = [pytest.param(*pair, marks=[] if pair in PAIRS else [pytest.mark.slow]) for pair in ALL_PAIRS]
MEAN_TOL, COV_TOL = 0.05, {"deterministic": 0.06, "stochastic": 0.12}


class LabelledData:
    """A module as `Guidance` uses it (device, conditioner, predict, schedule): the exact denoiser of `classes[k]`
    for label k, of `unconditional` for the null condition (label -1)."""

    device = torch.device("cpu")

    def __init__(self, schedule, unconditional, classes):
        self.schedule, self.unconditional, self.classes = schedule, unconditional, classes

    def conditioner(self, conditions: dict, force_drop: bool = False) -> Conditioning:
        labels = conditions["label"].to(torch.float64)
        return Conditioning(vector=(torch.full_like(labels, -1) if force_drop else labels)[:, None])

    def predict(self, x, t, cond: Conditioning):
        labels = cond.vector[:, 0].long()
        out = torch.empty_like(x)
        for label in labels.unique().tolist():
            rows = labels == label
            data = self.unconditional if label < 0 else self.classes[label]
            out[rows] = perfect_model(data, self.schedule)(x[rows], t[rows])
        return out


class ExactClassifier:
    """log p(y | x_t) of the mixture's components, in closed form (what `task=classifier` learns)."""

    label_key = "label"

    def __init__(self, mixture: GaussianMixture, schedule):
        self.mixture, self.schedule = mixture, schedule

    def log_likelihood(self, labels):
        def log_likelihood(x, t):
            alpha, sigma = self.schedule.alpha_sigma(t)
            return self.mixture.log_class_posterior(x, alpha, sigma).gather(1, labels[:, None])[:, 0]

        return log_likelihood


def mixture_model(schedule):
    return LabelledData(schedule, MIXTURE, [MIXTURE.component(k) for k in range(2)])


def labels(n: int = N):
    return {"label": torch.full((n,), LABEL)}


def draw(guidance: Guidance, module, sampler_name: str, n: int = N, steps: int | None = None, antithetic=False):
    sampler = SAMPLERS[sampler_name]
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(n // 2 if antithetic else n, 2, generator=g, **F64)
    noise = torch.cat([noise, -noise]) if antithetic else noise
    model_fn = guidance.model_fn(module, labels(len(noise)))
    return sampler(model_fn, noise, module.schedule, steps or STEPS[sampler_name], generator=g)


def grid_moments(log_density, center, half_width=4.0, points=801):
    """Mean and covariance of the law exp(log_density) on a 2-D grid (normalized numerically)."""
    axis = torch.linspace(-half_width, half_width, points, **F64)
    xs = torch.stack(torch.meshgrid(axis + center[0], axis + center[1], indexing="ij"), -1).reshape(-1, 2)
    weights = torch.softmax(log_density(xs), 0)
    mean = (weights[:, None] * xs).sum(0)
    centred = xs - mean
    return mean, (weights[:, None, None] * centred[:, :, None] * centred[:, None, :]).sum(0)


def at_data(data):
    """log p(x) of the data itself (noise level 0)."""
    return lambda x: data.log_density(x, torch.ones(len(x), **F64), torch.zeros(len(x), **F64))


def tilted(log_cond, log_reference, scale):
    return lambda x: scale * log_cond(x) + (1 - scale) * log_reference(x)


def assert_law(out, mean, cov, kind):
    assert torch.isfinite(out).all()
    mean_error = (out.mean(0) - mean).norm().item()
    cov_error = (torch.cov(out.T) - cov).norm().item()
    assert mean_error < MEAN_TOL, f"mean {out.mean(0).tolist()} instead of {mean.tolist()}"
    assert cov_error < COV_TOL[kind], f"covariance error {cov_error:.4f}: {torch.cov(out.T).tolist()}"


def kind_of(sampler_name):
    return "stochastic" if SAMPLERS[sampler_name].stochastic else "deterministic"


# ---- classifier guidance -----------------------------------------------------------------------------------

@pytest.mark.parametrize("p_name, sampler_name", MATRIX)
def test_classifier_guidance_of_the_unconditional_model_samples_the_class(p_name, sampler_name):
    """ADM's setting: an unconditional model (cfg_scale 0) and the classifier with scale 1 sample p(x | y), the
    tilted law p(x|y)^s p(x)^(1-s) at s = 1 (moments from the grid; a one-dimensional distribution test along
    the axis through both classes)."""
    module = mixture_model(SCHEDULES[p_name])
    guidance = Guidance(scale=0.0, classifier=ExactClassifier(MIXTURE, module.schedule), classifier_scale=1.0)
    out = draw(guidance, module, sampler_name)
    component = MIXTURE.component(LABEL)
    mean, cov = grid_moments(tilted(at_data(component), at_data(MIXTURE), 1.0), component.mean)
    assert_law(out, mean, cov, kind_of(sampler_name))
    axis = (MIXTURE.means[1] - MIXTURE.means[0]) / (MIXTURE.means[1] - MIXTURE.means[0]).norm()
    projected = ((out - mean) @ axis / MIXTURE.std).sort().values
    normal_cdf = 0.5 * (1 + torch.erf(projected / math.sqrt(2)))
    ks = (normal_cdf - torch.arange(1, len(out) + 1, **F64) / len(out)).abs().max().item()
    assert ks < 0.04, f"Kolmogorov-Smirnov distance {ks:.3f} from N(mean, std^2) along the class axis"


@pytest.mark.parametrize("p_name", SCHEDULES)
def test_classifier_guidance_is_the_score_of_the_tilted_noised_law(p_name):
    """scale 2.5: the guided noise estimate is -sigma grad log [p_t(x|y)^s p_t(x)^(1-s)], the gradient taken by
    central differences of the closed-form noised densities."""
    schedule, scale = SCHEDULES[p_name], 2.5
    module = mixture_model(schedule)
    guidance = Guidance(scale=0.0, classifier=ExactClassifier(MIXTURE, schedule), classifier_scale=scale)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 2, generator=g, **F64) * 1.5
    component = MIXTURE.component(LABEL)
    for t_value in (0.2, 0.5, 0.8):
        t = torch.full((6,), t_value, **F64)
        alpha, sigma = schedule.alpha_sigma(t)

        def log_q(points, alpha=alpha, sigma=sigma):
            a, s = alpha[:1].expand(len(points)), sigma[:1].expand(len(points))
            return scale * component.log_density(points, a, s) + (1 - scale) * MIXTURE.log_density(points, a, s)

        step = 1e-5
        gradient = torch.stack([(log_q(x + step * e) - log_q(x - step * e)) / (2 * step)
                                for e in torch.eye(2, **F64)], 1)
        _, noise = schedule.to_x0_noise(x, guidance.model_fn(module, labels(6))(x, t), t)
        torch.testing.assert_close(noise, -sigma[:, None] * gradient, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("p_name", SCHEDULES)
def test_classifier_guidance_on_cfg_adds_the_scales(p_name):
    """cond - uncond is grad log p(y | x_t) in score space, so CFG scale w under classifier scale s is the
    classifier alone with scale w + s on the unconditional model."""
    schedule = SCHEDULES[p_name]
    module, classifier = mixture_model(schedule), ExactClassifier(MIXTURE, schedule)
    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(1), **F64)
    for t_value in (0.3, 0.7):
        t = torch.full((5,), t_value, **F64)
        combined = Guidance(scale=2.0, classifier=classifier, classifier_scale=1.5).model_fn(module, labels(5))(x, t)
        alone = Guidance(scale=0.0, classifier=classifier, classifier_scale=3.5).model_fn(module, labels(5))(x, t)
        torch.testing.assert_close(combined, alone)


@pytest.mark.parametrize("p_name, sampler_name", [("flow", "euler"), ("edm", "heun"), ("ddpm", "ancestral")])
def test_classifier_and_cfg_scales_summing_to_one_sample_the_class(p_name, sampler_name):
    module = mixture_model(SCHEDULES[p_name])
    guidance = Guidance(scale=0.4, classifier=ExactClassifier(MIXTURE, module.schedule), classifier_scale=0.6)
    component = MIXTURE.component(LABEL)
    assert_law(draw(guidance, module, sampler_name), component.mean, component.cov, kind_of(sampler_name))


# ---- CFG and autoguidance ----------------------------------------------------------------------------------

def gaussian_pair(schedule, kind: str):
    """(module, guidance-maker): STRONG conditional against REFERENCE as the unconditional model (cfg) or as the
    weaker model (auto)."""
    if kind == "cfg":
        return LabelledData(schedule, REFERENCE, {LABEL: STRONG}), lambda **kw: Guidance(**kw)
    weak = LabelledData(schedule, None, {LABEL: REFERENCE})
    return LabelledData(schedule, None, {LABEL: STRONG}), lambda **kw: Guidance(weak=weak, **kw)


@pytest.mark.parametrize("kind", ["cfg", "auto"])
@pytest.mark.parametrize("p_name, sampler_name", MATRIX)
def test_guidance_of_one_covariance_samples_the_tilted_law(p_name, sampler_name, kind):
    """scale 3: p_strong^3 p_reference^-2, a Gaussian of covariance S centred at 3 m_strong - 2 m_reference."""
    module, make = gaussian_pair(SCHEDULES[p_name], kind)
    out = draw(make(scale=3.0), module, sampler_name)
    mean, cov = grid_moments(tilted(at_data(STRONG), at_data(REFERENCE), 3.0), 3 * STRONG.mean - 2 * REFERENCE.mean)
    assert_law(out, mean, cov, kind_of(sampler_name))


@pytest.mark.parametrize("p_name, sampler_name", [("flow", "euler"), ("v", "dpmpp_2m"), ("edm", "euler_ancestral")])
def test_cfg_and_autoguidance_reduce_to_the_mixture_and_the_class(p_name, sampler_name):
    """On the mixture: CFG scale 0 samples the mixture and 1 the class; autoguidance with the model itself as the
    weaker one samples the class at any scale, and scale 0 samples the weaker model's law."""
    schedule, kind = SCHEDULES[p_name], kind_of(sampler_name)
    module = mixture_model(schedule)
    component = MIXTURE.component(LABEL)
    mixture_mean, mixture_cov = grid_moments(at_data(MIXTURE), MIXTURE.means.mean(0), half_width=5.0)
    assert_law(draw(Guidance(scale=0.0), module, sampler_name), mixture_mean, mixture_cov, kind)
    assert_law(draw(Guidance(scale=1.0), module, sampler_name), component.mean, component.cov, kind)
    assert_law(draw(Guidance(scale=3.0, weak=module), module, sampler_name), component.mean, component.cov, kind)
    other = LabelledData(schedule, None, {LABEL: MIXTURE.component(1 - LABEL)})
    far = MIXTURE.component(1 - LABEL)
    assert_law(draw(Guidance(scale=0.0, weak=other), module, sampler_name), far.mean, far.cov, kind)


# ---- an interval of noise levels ---------------------------------------------------------------------------

VARIANCE = 0.25
ISOTROPIC = [Gaussian(g.mean, VARIANCE * torch.eye(2, **F64)) for g in (STRONG, REFERENCE)]


def interval_mean(schedule, scale: float, low: float, high: float) -> torch.Tensor:
    """The probability-flow ODE's final mean: guided mean m_g on (low, high], the strong mean elsewhere."""
    strong, reference = (g.mean for g in ISOTROPIC)
    guided = reference + scale * (strong - reference)
    top = noise_level(schedule, torch.ones(1, **F64)).item()  # the sampler starts from sigma_top * noise
    v = VARIANCE

    def weight(a, b):  # integral of sigma / (v + sigma^2)^(3/2) from a to b
        b = min(b, top)
        return max(0.0, 1 / math.sqrt(v + a**2) - (0.0 if math.isinf(b) else 1 / math.sqrt(v + b**2)))

    return math.sqrt(v) * (strong * weight(0.0, top) + (guided - strong) * weight(low, high))


def affine_law(guidance: Guidance, module, sampler_name: str, steps: int):
    """Mean and covariance of a deterministic sampler's output when it is affine in the noise (exact Gaussian
    models, guidance switched by t alone): from the images of 0 and of each unit vector."""
    inputs = torch.cat([torch.zeros(1, 2, **F64), torch.eye(2, **F64)])
    out = SAMPLERS[sampler_name](guidance.model_fn(module, labels(3)), inputs, module.schedule, steps)
    columns = out[1:] - out[0]
    return out[0], columns.T @ columns


@pytest.mark.parametrize("kind", ["cfg", "auto"])
@pytest.mark.parametrize("p_name", SCHEDULES)
@pytest.mark.parametrize("sampler_name", ["euler", "heun", "dpmpp_2m"])
def test_an_interval_in_sigma_gives_the_same_law_for_every_parameterization(sampler_name, p_name, kind):
    """Guidance on noise levels (0.4, 2] of sigma / alpha: the closed-form final mean, whatever t those levels
    are at in each schedule; the variance stays v (sigma_top^2 / (v + sigma_top^2) of it, from the start at
    sigma_top * noise). The switch at the interval's ends makes every sampler first order there: twice the usual
    steps (observed mean errors below 0.025)."""
    schedule = SCHEDULES[p_name]
    if kind == "cfg":
        module = LabelledData(schedule, ISOTROPIC[1], {LABEL: ISOTROPIC[0]})
        guidance = Guidance(scale=2.0, interval=NoiseInterval(0.4, 2.0))
    else:
        module = LabelledData(schedule, None, {LABEL: ISOTROPIC[0]})
        guidance = Guidance(scale=2.0, interval=NoiseInterval(0.4, 2.0),
                            weak=LabelledData(schedule, None, {LABEL: ISOTROPIC[1]}))
    mean, cov = affine_law(guidance, module, sampler_name, 2 * STEPS[sampler_name])
    expected = interval_mean(schedule, 2.0, 0.4, 2.0)
    unguided = interval_mean(schedule, 2.0, 0.4, 0.4)
    assert (expected - unguided).norm() > 0.3  # the interval moves the law by far more than the tolerance
    assert (mean - expected).norm() < 0.04, f"mean {mean.tolist()} instead of {expected.tolist()}"
    top = noise_level(schedule, torch.ones(1, **F64)).item()
    variance = VARIANCE if math.isinf(top) else VARIANCE * top**2 / (VARIANCE + top**2)
    # heun on v_ztsnr loses 8% of the variance with or without guidance, as in test_samplers.py
    torch.testing.assert_close(cov, variance * torch.eye(2, **F64), atol=0.025, rtol=0)
