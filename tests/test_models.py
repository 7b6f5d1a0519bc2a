"""Denoisers: published parameter counts, adaLN-Zero start, conditioning, masks, gradients, precision."""


import hydra
import pytest
import torch
from conftest import CONF, compose_config, perturb
from omegaconf import OmegaConf

from ldm.conditioners.class_embedder import ClassEmbedder
from ldm.contracts.conditioning import Conditioning
from ldm.models import DiT, UNet, check_conditioning

MODEL_CONF = CONF / "model"
BATCH, SIZE, CHANNELS, VECTOR, CONTEXT, CONCAT, TOKENS = 2, 8, 4, 6, 5, 3, 7


pytestmark = pytest.mark.usefixtures("one_thread")


def compose(name: str, image_size=32, downsample=4, latent_channels=4, vector_dim=None, context_dim=None,
            **overrides):
    """Instantiate the preset model=<name> (its defaults list applied) with the keys it interpolates."""
    settings = {"data.image_size": image_size, "autoencoder.downsample": downsample,
                "autoencoder.latent_channels": latent_channels, "conditioner.vector_dim": vector_dim,
                "conditioner.context_dim": context_dim} | {f"model.{key}": value for key, value in overrides.items()}
    cfg = compose_config([f"model={name}"] + [f"{key}={'null' if value is None else value}"
                                              for key, value in settings.items()])
    return hydra.utils.instantiate(cfg.model)


def count(*modules) -> int:
    return sum(parameter.numel() for module in modules for parameter in module.parameters())


# ---------------------------------------------------------------- tiny models with every condition

def tiny_dit(**kwargs):
    args = dict(input_size=SIZE, patch_size=2, in_channels=CHANNELS, hidden_size=32, depth=2, num_heads=2,
                vector_dim=VECTOR, context_dim=CONTEXT, concat_channels=CONCAT)
    return DiT(**(args | kwargs))


def tiny_unet(**kwargs):
    args = dict(in_channels=CHANNELS, channels=32, channel_mult=[1, 2], num_res_blocks=1,
                attention_resolutions=[1, 2], num_heads=2, vector_dim=VECTOR, context_dim=CONTEXT,
                concat_channels=CONCAT, input_size=SIZE)
    return UNet(**(args | kwargs))


def tiny_unet_plain(**kwargs):
    """Self-attention blocks (no context) and an added (not scale-shift) embedding."""
    return tiny_unet(**(dict(context_dim=None, use_scale_shift_norm=False) | kwargs))


BUILDERS = {"dit": tiny_dit, "unet": tiny_unet, "unet_plain": tiny_unet_plain}


def inputs(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(BATCH, CHANNELS, SIZE, SIZE, generator=g)
    t = torch.rand(BATCH, generator=g)
    fields = {
        "vector": torch.randn(BATCH, VECTOR, generator=g),
        "tokens": torch.randn(BATCH, TOKENS, CONTEXT, generator=g),
        "token_mask": torch.tensor([[True] * TOKENS, [True] * 4 + [False] * (TOKENS - 4)]),
        "concat": torch.randn(BATCH, CONCAT, SIZE, SIZE, generator=g),
    }
    return x, t, Conditioning(**{k: v for k, v in fields.items() if k in model.consumes})




# ---------------------------------------------------------------- published sizes, from the presets

@pytest.mark.parametrize("preset, published", [
    ("dit_s", 33.0e6), ("dit_b", 130.5e6), ("dit_l", 458.1e6), ("dit_xl", 675.1e6)])
def test_dit_parameter_count_matches_paper(preset, published):
    # DiT-*/2 on 32x32x4 latents (256px images, 8x VAE) with a 1000-class embedding of width hidden
    hidden = OmegaConf.load(MODEL_CONF / f"{preset}.yaml").hidden_size
    with torch.device("meta"):
        model = compose(preset, image_size=256, downsample=8, vector_dim=hidden)
        classes = ClassEmbedder(num_classes=1000, embed_dim=hidden)
    assert model.patch_size == 2 and model.input_size == (32, 32)
    assert abs(count(model, classes) - published) / published < 0.01


def test_unet_sd_parameter_count_matches_stable_diffusion():
    with torch.device("meta"):
        model = compose("unet_sd", image_size=512, downsample=8, context_dim=768)
    assert model.consumes == {"tokens", "token_mask"}
    assert abs(count(model) - 859.5e6) / 859.5e6 < 0.01


def test_patch_size_override_and_rectangular_latents():
    with torch.device("meta"):
        model = compose("dit_xl", image_size=256, downsample=8, vector_dim=1152, patch_size=4)
    assert model.patch_size == 4 and model.pos_embed.shape == (1, 64, 1152)
    model = DiT(input_size=[8, 4], patch_size=2, in_channels=4, hidden_size=32, depth=1, num_heads=2)
    assert perturb(model)(torch.randn(3, 4, 8, 4), torch.rand(3)).shape == (3, 4, 8, 4)


@pytest.mark.parametrize("preset", ["dit", "unet"])
def test_cpu_presets_follow_autoencoder_and_conditioner(preset):
    model = compose(preset, image_size=32, downsample=4, latent_channels=4, vector_dim=10)
    assert model.consumes == {"vector"}
    x = torch.randn(2, 4, 8, 8)
    assert model(x, torch.rand(2), Conditioning(vector=torch.randn(2, 10))).shape == x.shape


# ---------------------------------------------------------------- construction errors and the contract

def test_construction_errors_are_clear():
    with pytest.raises(ValueError, match="divisible by patch_size"):
        DiT(input_size=10, patch_size=4, hidden_size=32, depth=1, num_heads=2)
    with pytest.raises(ValueError, match="hidden_size divisible by num_heads"):
        DiT(input_size=8, patch_size=2, hidden_size=30, depth=1, num_heads=4)
    with pytest.raises(ValueError, match="6x6 is not divisible by 4"):
        tiny_unet(input_size=6, channel_mult=[1, 1, 1])
    unconditional = tiny_dit(vector_dim=None, context_dim=None, concat_channels=0)
    with pytest.raises(ValueError, match="built for 8x8 latents"):
        unconditional(torch.randn(1, CHANNELS, 4, 4), torch.rand(1))


@pytest.mark.parametrize("build", [tiny_dit, tiny_unet])
def test_consumes_follows_constructor(build):
    assert build().consumes == {"vector", "tokens", "token_mask", "concat"}
    assert build(vector_dim=None, context_dim=None, concat_channels=0).consumes == frozenset()


def test_check_conditioning_names_unconsumed_fields():
    model = tiny_dit(context_dim=None, concat_channels=0)
    check_conditioning(model, {"vector"})
    message = r"model=DiT does not consume Conditioning.tokens \(it consumes: vector\); set model.context_dim"
    with pytest.raises(ValueError, match=message):
        check_conditioning(model, {"vector", "tokens", "token_mask"})
    with pytest.raises(ValueError, match="Conditioning.concat"):
        check_conditioning(model, {"vector", "concat"})
    with pytest.raises(ValueError, match="needs Conditioning.vector"):
        check_conditioning(model, set())
    # the mask is optional beside tokens
    check_conditioning(tiny_unet(vector_dim=None, concat_channels=0), {"tokens"})
    # the forward pass checks too
    model = tiny_unet(vector_dim=None, concat_channels=0)
    x, t, cond = inputs(model)
    with pytest.raises(ValueError, match="does not consume Conditioning.vector"):
        model(x, t, Conditioning(vector=torch.randn(BATCH, VECTOR), tokens=cond.tokens))


# ---------------------------------------------------------------- behaviour

def test_dit_output_is_exactly_zero_at_init():
    model = tiny_dit()
    out = model(*inputs(model))
    assert out.shape == (BATCH, CHANNELS, SIZE, SIZE) and torch.count_nonzero(out) == 0


@pytest.mark.parametrize("name", ["dit", "unet"])
@pytest.mark.parametrize("field", ["t", "vector", "tokens", "concat"])
def test_each_condition_changes_output(name, field):
    model = perturb(BUILDERS[name]())
    x, t, cond = inputs(model)
    reference = model(x, t, cond)
    if field == "t":
        t = t + 0.1
    else:
        value = getattr(cond, field)
        setattr(cond, field, value + torch.randn_like(value))
    assert (model(x, t, cond) - reference).abs().max() > 1e-4


@pytest.mark.parametrize("name", ["dit", "unet"])
def test_token_mask_hides_masked_tokens(name):
    model = perturb(BUILDERS[name]())
    x, t, cond = inputs(model)  # sample 1 keeps tokens 0..3
    reference = model(x, t, cond)
    masked, kept = cond.tokens.clone(), cond.tokens.clone()
    masked[1, 5] += 3.0
    kept[1, 2] += 3.0
    torch.testing.assert_close(model(x, t, Conditioning(**(vars(cond) | {"tokens": masked}))), reference,
                               rtol=0, atol=1e-6)
    assert (model(x, t, Conditioning(**(vars(cond) | {"tokens": kept})))[1] - reference[1]).abs().max() > 1e-4
    # a sample with every token masked still gets a finite output
    cond.token_mask = torch.zeros_like(cond.token_mask)
    assert torch.isfinite(model(x, t, cond)).all()


@pytest.mark.parametrize("name", list(BUILDERS))
def test_gradients_reach_every_parameter(name):
    model = perturb(BUILDERS[name]())
    x, t, cond = inputs(model)
    model(x, t, cond).square().mean().backward()
    starved = [key for key, parameter in model.named_parameters()
               if parameter.grad is None or not parameter.grad.abs().sum() > 0]
    assert not starved


@pytest.mark.parametrize("name", list(BUILDERS))
def test_bf16_autocast_forward_backward_finite(name):
    model = perturb(BUILDERS[name]())
    x, t, cond = inputs(model)
    t = torch.tensor([-1.2, 0.4])  # EDM's c_noise = ln(sigma) / 4 can be negative
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t, cond)
    out.float().square().mean().backward()
    assert torch.isfinite(out).all()
    assert all(torch.isfinite(parameter.grad).all() for parameter in model.parameters())


def _checkpointed_modules(model):
    return model.blocks if isinstance(model, DiT) else [layer for stage in model.up_stages for layer in stage]


def _train_step(model, x, t, cond):
    """One forward and backward; returns the output, the gradients and how often the modules that
    checkpointing wraps were run (a pre-hook, since recomputation stops early, before forward hooks)."""
    model.zero_grad()
    calls = []
    handles = [m.register_forward_pre_hook(lambda *_: calls.append(1)) for m in _checkpointed_modules(model)]
    out = model(x, t, cond)
    out.square().mean().backward()
    for handle in handles:
        handle.remove()
    return out.detach(), [parameter.grad.clone() for parameter in model.parameters()], len(calls)


@pytest.mark.parametrize("name", ["dit", "unet"])
def test_gradient_checkpointing_matches_and_recomputes(name):
    model = perturb(BUILDERS[name]())
    x, t, cond = inputs(model)
    out_plain, grads_plain, calls_plain = _train_step(model, x, t, cond)
    model.gradient_checkpointing = True
    out_ckpt, grads_ckpt, calls_ckpt = _train_step(model, x, t, cond)
    torch.testing.assert_close(out_ckpt, out_plain)
    for plain, ckpt in zip(grads_plain, grads_ckpt, strict=True):
        torch.testing.assert_close(ckpt, plain)
    assert calls_ckpt == 2 * calls_plain  # recomputed in backward
    model.eval()  # inactive outside training
    assert _train_step(model, x, t, cond)[2] == calls_plain


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", list(BUILDERS))
def test_cuda_bf16(name):
    model = perturb(BUILDERS[name]()).cuda()
    x, t, cond = inputs(model)
    x, t, cond = x.cuda(), t.cuda(), cond.map(lambda v: v.cuda())
    model.gradient_checkpointing = True
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(x, t, cond)
    out.float().square().mean().backward()
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert all(torch.isfinite(parameter.grad).all() for parameter in model.parameters())
