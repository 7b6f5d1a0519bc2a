"""The time a pretrained network sees: schedule.time_input=level gives diffusers' integer timesteps exactly."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.models.embeddings import TimestepEmbedding, Timesteps

from ldm.models.layers import TimestepEmbedder, timestep_embedding
from ldm.schedules import DDPM
from ldm.schedules.v import VPrediction


@pytest.mark.parametrize("steps", [1000, 250, 50, 10])
@pytest.mark.parametrize("scheduler", [DDPMScheduler, DDIMScheduler])
def test_level_input_is_diffusers_timestep(steps, scheduler):
    reference = scheduler(num_train_timesteps=1000, timestep_spacing="trailing")
    reference.set_timesteps(steps)
    schedule = DDPM(time_input="level")
    times = schedule.timesteps(steps)[:-1].to(torch.float32)  # the samplers cast the grid to the noise's dtype
    for x_dtype in (torch.float32, torch.bfloat16):
        x = torch.zeros(len(times), 2, dtype=x_dtype)
        x_in, t_in = schedule.model_input(x, times)
        assert x_in is x and t_in.dtype == torch.float32
        assert torch.equal(t_in, reference.timesteps.to(torch.float32))


def test_level_input_between_levels_and_unit_input_unchanged():
    schedule = VPrediction(time_input="level", num_timesteps=100)
    t = torch.tensor([0.105, 0.5, 1.0], dtype=torch.float32)
    assert torch.allclose(schedule.model_input(t, t)[1], torch.tensor([9.5, 49.0, 99.0]), atol=1e-4)
    unit = DDPM()
    assert unit.time_input == "unit"
    x, t = torch.randn(3, 4), torch.rand(3)
    x_in, t_in = unit.model_input(x, t)
    assert x_in is x and t_in is t
    with pytest.raises(ValueError, match="schedule.time_input must be one of unit, level"):
        DDPM(time_input="steps")


# diffusers' Timesteps arguments: DiT (CombinedTimestepLabelEmbeddings) and Stable Diffusion's UNet
REFERENCES = {"dit_diffusers": dict(flip_sin_to_cos=True, downscale_freq_shift=1),
              "sd": dict(flip_sin_to_cos=True, downscale_freq_shift=0)}


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_timestep_embedder_on_levels_matches_reference(name):
    settings = REFERENCES[name]
    torch.manual_seed(0)
    proj, mlp = Timesteps(256, **settings), TimestepEmbedding(256, 64)
    ours = TimestepEmbedder(64, 256, time_scale=1.0, frequency_shift=settings["downscale_freq_shift"])
    with torch.no_grad():
        for own, theirs in ((ours.mlp[0], mlp.linear_1), (ours.mlp[2], mlp.linear_2)):
            own.weight.copy_(theirs.weight)
            own.bias.copy_(theirs.bias)
    levels = DDPM(time_input="level").model_input(torch.zeros(5), torch.tensor([1, 11, 501, 981, 1000]) / 1000.0)[1]
    reference = mlp(proj(levels.long()))
    assert torch.equal(timestep_embedding(levels, 256, frequency_shift=settings["downscale_freq_shift"]),
                       proj(levels.long()))
    assert (ours(levels) - reference).abs().max() <= 1e-6 * reference.abs().max()


def test_frequency_shift_matters():
    # the published DiT code embeds with shift 0, diffusers' DiT with shift 1: not interchangeable
    levels = torch.tensor([999.0])
    diffusers_dit = Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=1)(levels)
    assert (timestep_embedding(levels, 256) - diffusers_dit).abs().max() > 0.5
