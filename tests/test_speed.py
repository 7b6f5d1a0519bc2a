"""Speed features of the denoisers and the training step, each against the plain path or a reference.

Fused attention projections against torch's nn.MultiheadAttention (and checkpoints of the earlier
to_q + to_kv layout), the CPU bf16 attention path against float64 attention, torch.compile against
eager, fused / foreach AdamW against the plain loop, channels_last against the default layout.
"""

import hydra
import pytest
import torch
import torch.nn.functional as F
from conftest import compose_config, perturb
from torch import nn

from ldm.contracts.conditioning import Conditioning
from ldm.models import DiT, UNet
from ldm.models.layers import Attention, attention, compile_problem, fuse_attention_keys
from ldm.tasks.optim import parameter_groups, upgraded_optimizer_state
from ldm.utils.errors import ConfigError

WIDTH, HEADS, TOKENS, CONTEXT, KEYS = 32, 4, 10, 12, 6


pytestmark = pytest.mark.usefixtures("one_thread")




def reference_mha(kdim=None, seed=0) -> nn.MultiheadAttention:
    torch.manual_seed(seed)
    mha = nn.MultiheadAttention(WIDTH, HEADS, batch_first=True, kdim=kdim, vdim=kdim)
    return perturb(mha, scale=0.1)


def self_attention_from(mha: nn.MultiheadAttention, old_layout: bool) -> Attention:
    """An Attention holding `mha`'s weights, loaded from the current (to_qkv) or the earlier (to_q, to_kv) keys."""
    d = WIDTH
    weight, bias = mha.in_proj_weight.detach(), mha.in_proj_bias.detach()  # rows [q | k | v]
    if old_layout:
        state = {"to_q.weight": weight[:d], "to_q.bias": bias[:d], "to_kv.weight": weight[d:], "to_kv.bias": bias[d:]}
    else:
        state = {"to_qkv.weight": weight, "to_qkv.bias": bias}
    state |= {"to_out.weight": mha.out_proj.weight.detach(), "to_out.bias": mha.out_proj.bias.detach()}
    layer = Attention(WIDTH, HEADS)
    layer.load_state_dict(state, strict=True)
    return layer


# ---------------------------------------------------------------- fused projections and old checkpoints

@pytest.mark.parametrize("old_layout", [False, True], ids=["to_qkv", "old to_q + to_kv"])
def test_fused_self_attention_matches_torch_multihead_attention(old_layout):
    mha = reference_mha()
    layer = self_attention_from(mha, old_layout)
    x = torch.randn(3, TOKENS, WIDTH)
    expected = mha(x, x, x, need_weights=False)[0]
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    assert set(layer.state_dict()) == {"to_qkv.weight", "to_qkv.bias", "to_out.weight", "to_out.bias"}


def test_cross_attention_with_mask_matches_torch_multihead_attention():
    mha = reference_mha(kdim=CONTEXT)
    layer = Attention(WIDTH, HEADS, context_dim=CONTEXT)
    d = WIDTH
    layer.load_state_dict({
        "to_q.weight": mha.q_proj_weight.detach(), "to_q.bias": mha.in_proj_bias[:d].detach(),
        "to_kv.weight": torch.cat([mha.k_proj_weight, mha.v_proj_weight]).detach(),
        "to_kv.bias": mha.in_proj_bias[d:].detach(),
        "to_out.weight": mha.out_proj.weight.detach(), "to_out.bias": mha.out_proj.bias.detach()}, strict=True)
    x, context = torch.randn(2, TOKENS, WIDTH), torch.randn(2, KEYS, CONTEXT)
    mask = torch.tensor([[True] * KEYS, [True] * 2 + [False] * (KEYS - 2)])
    expected = mha(x, context, context, key_padding_mask=~mask, need_weights=False)[0]  # True = ignore there
    for precision, tolerance in ((torch.float32, 1e-5), (torch.bfloat16, 3e-2)):
        with torch.autocast("cpu", dtype=precision, enabled=precision != torch.float32):
            out = layer(x, context, mask).float()
        torch.testing.assert_close(out, expected, rtol=tolerance, atol=tolerance)


def test_self_attention_refuses_a_context():
    with pytest.raises(ValueError, match="build it with context_dim"):
        Attention(WIDTH, HEADS)(torch.randn(1, 2, WIDTH), torch.randn(1, 3, WIDTH))


def old_layout(state: dict) -> dict:
    """A state dict as the earlier versions wrote it: every self-attention's to_qkv as to_q and to_kv."""
    out = {}
    for key, value in state.items():
        if ".to_qkv." in key:
            width = value.shape[0] // 3
            out[key.replace(".to_qkv.", ".to_q.")] = value[:width]
            out[key.replace(".to_qkv.", ".to_kv.")] = value[width:]
        else:
            out[key] = value
    return out


@pytest.mark.parametrize("build", [
    lambda: DiT(input_size=8, in_channels=4, hidden_size=WIDTH, depth=2, num_heads=HEADS, context_dim=CONTEXT),
    lambda: UNet(in_channels=4, channels=32, channel_mult=[1, 2], num_res_blocks=1, attention_resolutions=[1, 2],
                 num_heads=2, context_dim=CONTEXT, input_size=8),
], ids=["dit", "unet"])
def test_checkpoint_of_the_earlier_layout_loads(build):
    trained = perturb(build())
    old = old_layout(trained.state_dict())
    assert any(".to_q." in key for key in old) and not any(".to_qkv." in key for key in old)
    x, t = torch.randn(2, 4, 8, 8), torch.rand(2)
    cond = Conditioning(tokens=torch.randn(2, KEYS, CONTEXT))
    fresh = build()
    fresh.load_state_dict(old, strict=True)
    torch.testing.assert_close(fresh(x, t, cond), trained(x, t, cond))
    # an EMA average is a plain dict under the LightningModule's names: fused the same way
    average = {f"denoiser.{key}": value for key, value in old.items()}
    fused = fuse_attention_keys(fresh, average, prefix="denoiser.")
    assert fused.keys() == {f"denoiser.{key}" for key in trained.state_dict()}
    assert ".to_q." in next(key for key in average if ".to_q." in key)  # the argument is left as it was


# ---------------------------------------------------------------- attention kernels

@pytest.mark.parametrize("queries, keys, masked", [(16, 16, False), (64, 77, True)])
def test_cpu_bf16_attention_matches_float64(queries, keys, masked):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, queries, 16, generator=g)
    k, v = torch.randn(2, 2, 3, keys, 16, generator=g)
    mask = (torch.rand(2, 1, 1, keys, generator=g) > 0.3) | (torch.arange(keys) == 0) if masked else None
    expected = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask)
    tensors = [tensor.bfloat16().requires_grad_() for tensor in (q, k, v)]
    out = attention(*tensors, mask)
    out.float().square().sum().backward()
    torch.testing.assert_close(out.double(), expected, rtol=2e-2, atol=2e-2)
    reference = [tensor.double().requires_grad_() for tensor in (q, k, v)]
    F.scaled_dot_product_attention(*reference, attn_mask=mask).square().sum().backward()
    for mine, theirs in zip(tensors, reference, strict=True):
        torch.testing.assert_close(mine.grad.double(), theirs.grad, rtol=5e-2, atol=5e-2)


def test_attention_hands_sdpa_strided_views_and_no_mask(monkeypatch):
    """What the CUDA flash kernel needs: no mask tensor without a mask, and unit stride in the head dimension."""
    seen, sdpa = [], F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None):
        seen.append((q, k, v, attn_mask))
        return sdpa(q, k, v, attn_mask=attn_mask)

    monkeypatch.setattr("ldm.models.layers.F.scaled_dot_product_attention", spy)
    layer = Attention(WIDTH, HEADS)
    layer(torch.randn(2, TOKENS, WIDTH))  # float32: always scaled_dot_product_attention
    (q, k, v, mask), = seen
    assert mask is None
    assert all(tensor.shape == (2, HEADS, TOKENS, WIDTH // HEADS) and tensor.stride(-1) == 1 for tensor in (q, k, v))
    assert q.data_ptr() != k.data_ptr() != v.data_ptr()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_attention_runs_on_the_flash_kernel():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    layer = Attention(64, 2).cuda()
    x = torch.randn(2, 128, 64, device="cuda", requires_grad=True)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION), torch.autocast("cuda", dtype=torch.bfloat16):
        out = layer(x)  # raises if the flash kernel cannot take these inputs
    out.float().sum().backward()


def tiny_dit(**kwargs):
    return DiT(input_size=8, in_channels=4, hidden_size=64, depth=2, num_heads=4, vector_dim=10, **kwargs)


def test_dit_bf16_autocast_is_close_to_float32():
    model = perturb(tiny_dit(), scale=0.1)
    g = torch.Generator().manual_seed(0)
    x, t, vector = torch.randn(4, 4, 8, 8, generator=g), torch.rand(4, generator=g), torch.randn(4, 10, generator=g)
    cond = Conditioning(vector=vector)
    expected = model(x, t, cond)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t, cond)
    error = (out.float() - expected).norm() / expected.norm()
    assert error < 2e-2, f"bf16 autocast output is {error:.3g} away from float32 (relative norm)"


# ---------------------------------------------------------------- torch.compile

def _compiled_and_eager(build, inputs):
    from torch._dynamo.utils import counters

    counters.clear()
    eager = perturb(build())
    compiled = build(compile=True)
    compiled.load_state_dict(eager.state_dict())
    outputs, grads = [], []
    for model in (eager, compiled):
        out = model(*inputs)
        out.square().mean().backward()
        outputs.append(out.detach())
        grads.append({name: p.grad for name, p in model.named_parameters()})
    assert counters["stats"]["unique_graphs"] >= 1, "nothing was compiled"
    return outputs, grads


@pytest.mark.skipif(compile_problem(torch.device("cpu")) is not None,
                    reason=f"torch.compile cannot run here: {compile_problem(torch.device('cpu'))}")
def test_compiled_dit_matches_eager():
    x, t, vector = torch.randn(2, 4, 8, 8), torch.rand(2), torch.randn(2, 10)
    outputs, grads = _compiled_and_eager(tiny_dit, (x, t, Conditioning(vector=vector)))
    (eager, compiled), (eager_grads, compiled_grads) = outputs, grads
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)
    assert compiled_grads.keys() == eager_grads.keys()  # compiled in place: the same parameter names
    for name, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-3, atol=1e-5, msg=name)


@pytest.mark.slow
@pytest.mark.skipif(compile_problem(torch.device("cpu")) is not None,
                    reason=f"torch.compile cannot run here: {compile_problem(torch.device('cpu'))}")
def test_compiled_unet_matches_eager():
    def build(**kwargs):
        return UNet(in_channels=4, channels=32, channel_mult=[1, 2], num_res_blocks=1, attention_resolutions=[2],
                    num_heads=2, context_dim=CONTEXT, input_size=8, use_scale_shift_norm=False, **kwargs)

    inputs = (torch.randn(2, 4, 8, 8), torch.rand(2), Conditioning(tokens=torch.randn(2, KEYS, CONTEXT)))
    (eager, compiled), (eager_grads, compiled_grads) = _compiled_and_eager(build, inputs)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)
    for name, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-3, atol=1e-5, msg=name)


def test_compile_without_a_compiler_names_the_key(monkeypatch):
    import torch._inductor.config as inductor

    monkeypatch.setattr(inductor.cpp, "cxx", ("no-such-compiler-for-ldm",))
    model = tiny_dit(compile=True)
    with pytest.raises(ConfigError, match="model.compile=true.*C\\+\\+ compiler.*set model.compile=false"):
        model(torch.randn(1, 4, 8, 8), torch.rand(1), Conditioning(vector=torch.randn(1, 10)))


# ---------------------------------------------------------------- optimizer and memory layout

@pytest.mark.parametrize("option", ["fused", "foreach"])
def test_fused_and_foreach_adamw_match_the_plain_loop(option):
    cfg = compose_config([f"optimizer.{option}=true", "optimizer.weight_decay=0.05"])
    models = [perturb(tiny_dit()) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    plain = torch.optim.AdamW(parameter_groups(models[0]), lr=cfg.optimizer.lr, weight_decay=0.05, foreach=False,
                              fused=False)
    configured = hydra.utils.instantiate(cfg.optimizer)(parameter_groups(models[1]))
    assert configured.defaults[option] is True
    start = [parameter.detach().clone() for parameter in models[0].parameters()]
    g = torch.Generator().manual_seed(0)
    for _ in range(4):
        grads = [torch.randn(p.shape, generator=g) for p in models[0].parameters()]
        for model, optimizer in zip(models, (plain, configured), strict=True):
            for parameter, grad in zip(model.parameters(), grads, strict=True):
                parameter.grad = grad.clone()
            optimizer.step()
    assert all(not torch.equal(now, before) for now, before in zip(models[0].parameters(), start, strict=True))
    for (name, mine), theirs in zip(models[1].named_parameters(), models[0].parameters(), strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-6, atol=1e-7, msg=name)


class EarlierSelfAttention(nn.Module):
    """The parameters of self-attention before the fused projection: to_q, then to_kv ([k | v] rows)."""

    def __init__(self, dim):
        super().__init__()
        self.to_q, self.to_kv, self.to_out = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim), nn.Linear(dim, dim)


def test_optimizer_state_of_the_earlier_layout_continues_the_same_trajectory():
    model = tiny_dit()
    earlier = tiny_dit()
    for block in earlier.blocks:  # same place in the module order as the attention it replaces
        block.attn = EarlierSelfAttention(64)
    earlier.load_state_dict(old_layout(model.state_dict()))
    optimizers = [torch.optim.AdamW(parameter_groups(m), lr=1e-2, weight_decay=0.1) for m in (model, earlier)]
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        grads = {name: torch.randn(p.shape, generator=g) for name, p in model.named_parameters()}
        for name, grad in old_layout(grads).items():
            earlier.get_parameter(name).grad = grad
        for name, grad in grads.items():
            model.get_parameter(name).grad = grad
        for optimizer in optimizers:
            optimizer.step()
    expected, saved = (optimizer.state_dict() for optimizer in optimizers)
    upgraded = upgraded_optimizer_state(model, saved)
    assert upgraded["param_groups"] == expected["param_groups"]
    assert upgraded["state"].keys() == expected["state"].keys()
    for index, moments in expected["state"].items():
        for key, value in moments.items():
            torch.testing.assert_close(upgraded["state"][index][key], value, msg=f"{index} {key}")
    assert upgraded_optimizer_state(model, expected) is expected


def test_channels_last_unet_matches_the_default_layout():
    def build(**kwargs):
        return UNet(in_channels=4, channels=32, channel_mult=[1, 2], num_res_blocks=1, attention_resolutions=[2],
                    num_heads=2, context_dim=CONTEXT, input_size=8, **kwargs)

    plain = perturb(build())
    nhwc = build(channels_last=True)
    nhwc.load_state_dict(plain.state_dict())
    assert nhwc.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert not nhwc.conv_in.weight.is_contiguous()
    x, t = torch.randn(2, 4, 8, 8), torch.rand(2)
    cond = Conditioning(tokens=torch.randn(2, KEYS, CONTEXT))
    outputs = []
    for model in (plain, nhwc):
        out = model(x, t, cond)
        out.square().mean().backward()
        outputs.append(out)
    assert outputs[1].is_contiguous()
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-4, atol=1e-5)
    for (name, mine), theirs in zip(nhwc.named_parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_a_run_checkpoint_of_the_earlier_attention_layout_still_samples():
    """sample.py on a run saved before self-attention had one qkv projection: weights and EMA average load."""
    from conftest import TINY, compose_config

    from ldm.run.build import build_diffusion
    from ldm.utils.checkpoint import EMA_KEY

    def earlier(state: dict) -> dict:  # the earlier names, written here rule by rule: to_q + to_kv
        old = {}
        for key, value in state.items():
            if ".to_qkv." in key:
                q, kv = value.split([value.shape[0] // 3, 2 * value.shape[0] // 3])
                old[key.replace(".to_qkv.", ".to_q.")], old[key.replace(".to_qkv.", ".to_kv.")] = q, kv
            else:
                old[key] = value
        return old

    cfg = compose_config(TINY)
    trained = build_diffusion(cfg)
    with torch.no_grad():
        for parameter in trained.parameters():
            if parameter.requires_grad:  # the frozen autoencoder is checked by its hash
                parameter.add_(0.01 * torch.randn_like(parameter))
    average = {name: p.detach() + 0.5 for name, p in trained.named_parameters() if p.requires_grad}
    checkpoint = {"state_dict": earlier(trained.state_dict()), EMA_KEY: earlier(average)}
    trained.on_save_checkpoint(checkpoint)
    assert any(".to_q." in key for key in checkpoint["state_dict"])

    fresh = build_diffusion(cfg)
    fresh.load_checkpoint(checkpoint, ema=True)
    for name, parameter in fresh.named_parameters():
        expected = average[name] if name in average else trained.state_dict()[name]
        assert torch.equal(parameter, expected), name
