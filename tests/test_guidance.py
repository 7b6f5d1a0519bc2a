"""Classifier-free guidance wraps a conditional network into a model_fn."""

import pytest
import torch

from ldm.contracts.conditioning import Conditioning
from ldm.guidance import classifier_free_guidance
from ldm.samplers import Euler
from ldm.schedules import RectifiedFlow


class FakeNet:
    """pred = x * (1 + vector) + t: distinct for the two conditionings; counts calls and batch sizes."""

    def __init__(self):
        self.batches = []

    def __call__(self, x, t, cond):
        self.batches.append(x.shape[0])
        return x * (1 + cond.vector[:, :, None, None]) + t[:, None, None, None]


@pytest.fixture
def setup():
    g = torch.Generator().manual_seed(0)
    cond = Conditioning(vector=torch.rand(4, 3, generator=g) + 1)
    uncond = Conditioning(vector=torch.zeros(4, 3))
    x = torch.randn(4, 3, 5, 5, generator=g)
    t = torch.full((4,), 0.5)
    return FakeNet(), cond, uncond, x, t


def test_scale_one_is_the_conditional_prediction(setup):
    net, cond, uncond, x, t = setup
    out = classifier_free_guidance(net, cond, uncond, scale=1.0)(x, t)
    torch.testing.assert_close(out, net(x, t, cond))
    assert net.batches == [4, 4]  # one call each: ours, then the reference


def test_formula_and_one_batched_call_per_evaluation(setup):
    net, cond, uncond, x, t = setup
    model_fn = classifier_free_guidance(net, cond, uncond, scale=4.0)
    out = model_fn(x, t)
    assert net.batches == [8]
    c, u = net(x, t, cond), net(x, t, uncond)
    torch.testing.assert_close(out, u + 4.0 * (c - u))


def test_one_batched_call_per_sampler_step(setup):
    net, cond, uncond, x, _ = setup
    Euler()(classifier_free_guidance(net, cond, uncond, scale=3.0), x, RectifiedFlow(), 6)
    assert net.batches == [8] * 6


def test_rescale(setup):
    net, cond, uncond, x, t = setup
    c, u = net(x, t, cond), net(x, t, uncond)
    guided = u + 5.0 * (c - u)
    full = classifier_free_guidance(net, cond, uncond, scale=5.0, rescale=1.0)(x, t)
    dims = (1, 2, 3)
    torch.testing.assert_close(full.std(dim=dims), c.std(dim=dims))
    ratio = c.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True)
    torch.testing.assert_close(full, guided * ratio)
    half = classifier_free_guidance(net, cond, uncond, scale=5.0, rescale=0.5)(x, t)
    torch.testing.assert_close(half, (full + guided) / 2)
    assert not torch.allclose(guided.std(dim=dims), c.std(dim=dims))


def test_interval_switches_guidance(setup):
    net, cond, uncond, x, _ = setup
    model_fn = classifier_free_guidance(net, cond, uncond, scale=4.0, interval=(0.2, 0.6))
    for t_value, guided in [(0.1, False), (0.2, True), (0.5, True), (0.6, True), (0.9, False)]:
        t = torch.full((4,), t_value)
        net.batches.clear()
        out = model_fn(x, t)
        c, u = net(x, t, cond), net(x, t, uncond)
        torch.testing.assert_close(out, u + 4.0 * (c - u) if guided else c)
        assert net.batches[0] == (8 if guided else 4)


def test_interval_per_sample(setup):
    net, cond, uncond, x, _ = setup
    t = torch.tensor([0.1, 0.3, 0.5, 0.9])
    out = classifier_free_guidance(net, cond, uncond, scale=4.0, interval=(0.2, 0.6))(x, t)
    c, u = net(x, t, cond), net(x, t, uncond)
    torch.testing.assert_close(out[1:3], (u + 4.0 * (c - u))[1:3])
    torch.testing.assert_close(out[[0, 3]], c[[0, 3]])


def test_bad_interval():
    with pytest.raises(ValueError, match="interval"):
        classifier_free_guidance(FakeNet(), Conditioning(), Conditioning(), scale=2.0, interval=(0.8, 0.2))


# ---- the guidance group's parts --------------------------------------------------------------------------

def test_an_interval_in_sigma_is_one_in_t_where_the_schedule_has_those_levels():
    """Flow's sigma/alpha is t / (1 - t): levels (0.25, 3] are t in (0.2, 0.75]."""
    from ldm.guidance import NoiseInterval

    t = torch.tensor([0.1, 0.2, 0.21, 0.5, 0.75, 0.76, 1.0], dtype=torch.float64)
    inside = NoiseInterval(0.25, 3.0).inside(RectifiedFlow(), t)
    assert inside.tolist() == [False, False, True, True, True, False, False]  # t = 1: sigma/alpha is infinite


def test_the_config_options_become_the_guidance_they_name():
    from ldm.guidance import CFG, Classifier, NoiseInterval

    assert CFG(interval=[0.3, 5]).noise_interval() == NoiseInterval(0.3, 5.0)
    assert CFG(interval_t=[0.1, 0.9]).noise_interval() == NoiseInterval(0.1, 0.9, in_t=True)
    assert Classifier().noise_interval() is None
    with pytest.raises(ValueError, match="give one of them"):
        CFG(interval=[0.3, 5], interval_t=[0.1, 0.9]).noise_interval()


def test_records_and_network_batches():
    from ldm.guidance import Guidance, NoiseInterval, as_guidance

    assert as_guidance(None, 2.5).record()["guidance"] == 2.5 and as_guidance(3, 2.5).scale == 3.0
    plain = Guidance(scale=1.0)
    assert (plain.kind, plain.network_batches()) == ("cfg", 1)
    guided = Guidance(scale=2.0, interval=NoiseInterval(0.3, 5.0), classifier=object(), classifier_scale=4.0)
    record = guided.record()
    assert (guided.kind, guided.network_batches()) == ("classifier", 3)
    assert (record["guidance"], record["guidance_cfg_scale"], record["guidance_interval"]) == (4.0, 2.0, [0.3, 5.0])


def test_the_table_tells_guidance_settings_apart():
    from ldm.evaluation.table import guidance_text

    assert guidance_text({"guidance": 2.0}) == "2"  # records from before the other kinds
    assert guidance_text({"guidance": 2.0, "guidance_kind": "cfg", "guidance_interval": [0.3, 5.0],
                          "guidance_interval_in": "sigma"}) == "2 sigma in (0.3, 5]"
    assert guidance_text({"guidance": 1.0, "guidance_kind": "classifier", "guidance_cfg_scale": 0.0}) == \
        "classifier 1 (cfg 0)"
    weak = {"guidance": 2.0, "guidance_kind": "auto", "guidance_weak": "/runs/a:/runs/a/x.ckpt:step 250"}
    assert guidance_text(weak) == "auto 2 (weak a step 250)"
