"""The training step's speed choices: the fused AdamW kernel by default (and gradient clipping with it under bf16,
which Lightning refuses), denormals flushed while training, the DiT's residual stream in autocast's dtype, token
streams that are token-major in memory."""

from types import SimpleNamespace

import hydra
import pytest
import torch
from conftest import TINY, compose_config, perturb, train_run
from lightning.pytorch.plugins.precision import MixedPrecision
from torch import nn

from ldm.contracts.conditioning import Conditioning
from ldm.models import DiT, UNet
from ldm.tasks.optim import clip_gradients, make_optimizer, parameter_groups

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_dit() -> DiT:
    return DiT(input_size=8, in_channels=4, hidden_size=64, depth=2, num_heads=4, vector_dim=10)


def configured_optimizer(overrides: list[str], trainer=None) -> torch.optim.Optimizer:
    factory = hydra.utils.instantiate(compose_config(overrides).optimizer)
    return make_optimizer(factory, parameter_groups(tiny_dit()), trainer)


def implementation(optimizer: torch.optim.Optimizer) -> tuple[bool, bool]:
    return bool(optimizer.defaults["fused"]), bool(optimizer.defaults["foreach"])


def test_the_default_optimizer_is_fused_and_a_named_choice_is_kept():
    assert implementation(configured_optimizer([])) == (True, False)
    assert implementation(configured_optimizer(["optimizer.fused=false"])) == (False, False)
    assert implementation(configured_optimizer(["optimizer.foreach=true"])) == (False, True)
    assert implementation(configured_optimizer(["optimizer.foreach=false"])) == (False, False)


def test_fp16_with_clipping_keeps_torchs_default_which_lightning_can_clip():
    fp16 = MixedPrecision("16-mixed", "cpu")  # a loss scale, which a fused step unscales itself
    assert fp16.scaler is not None
    assert implementation(configured_optimizer([], SimpleNamespace(precision_plugin=fp16, gradient_clip_val=1.0)))[0] \
        is False
    assert implementation(configured_optimizer([], SimpleNamespace(precision_plugin=fp16, gradient_clip_val=0)))[0]
    bf16 = MixedPrecision("bf16-mixed", "cpu")
    assert implementation(configured_optimizer([], SimpleNamespace(precision_plugin=bf16, gradient_clip_val=1.0)))[0]


class Attached(nn.Module):
    """Stands for the LightningModule: its trainer, and Lightning's clipping as LightningModule.clip_gradients."""

    def __init__(self, plugin):
        super().__init__()
        self.layer = nn.Linear(8, 8)
        self.trainer = SimpleNamespace(precision_plugin=plugin)

    def clip_gradients(self, optimizer, gradient_clip_val, gradient_clip_algorithm):
        self.trainer.precision_plugin.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm or "norm")


@pytest.mark.parametrize("algorithm", ["norm", "value"])
def test_bf16_clips_a_fused_optimizer_as_lightning_clips_the_loop(algorithm):
    from lightning.pytorch.utilities import GradClipAlgorithmType

    plugin = MixedPrecision("bf16-mixed", "cpu")
    modules = [Attached(plugin) for _ in range(2)]
    modules[1].load_state_dict(modules[0].state_dict())
    g = torch.Generator().manual_seed(0)
    grads = [10 * torch.randn(p.shape, generator=g) for p in modules[0].parameters()]
    optimizers = [torch.optim.AdamW(modules[0].parameters(), fused=True),
                  torch.optim.AdamW(modules[1].parameters(), fused=False)]
    for module in modules:
        for parameter, grad in zip(module.parameters(), grads, strict=True):
            parameter.grad = grad.clone()
    with pytest.raises(RuntimeError, match="fused"):  # Lightning's own refusal, which clip_gradients passes
        plugin.clip_gradients(optimizers[0], 0.5, GradClipAlgorithmType(algorithm))
    clip_gradients(modules[0], optimizers[0], 0.5, algorithm)
    plugin.clip_gradients(optimizers[1], 0.5, GradClipAlgorithmType(algorithm))  # Lightning, the loop optimizer
    clipped = [p.grad for p in modules[0].parameters()]
    for mine, lightnings, grad in zip(clipped, (p.grad for p in modules[1].parameters()), grads, strict=True):
        torch.testing.assert_close(mine, lightnings)
        assert not torch.equal(mine, grad)
    if algorithm == "norm":
        assert torch.linalg.vector_norm(torch.cat([c.flatten() for c in clipped])).item() == pytest.approx(0.5)
    else:
        assert max(c.abs().max().item() for c in clipped) == pytest.approx(0.5)


def test_default_training_in_bf16_steps_a_fused_optimizer_with_clipping_and_flushes_denormals(tmp_path):
    try:
        torch.set_flush_denormal(False)
        train_run(TINY + ["logger=none", "trainer.max_steps=2", "trainer.val_check_interval=2",
                          "trainer.precision=bf16-mixed", "trainer.gradient_clip_val=1.0",
                          "callbacks.sample_metrics=null"], tmp_path)
        flushed = torch.tensor([1e-39]).mul(1.0).item() == 0.0
    finally:
        torch.set_flush_denormal(False)
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert [group["fused"] for group in checkpoint["optimizer_states"][0]["param_groups"]] == [True, True]
    assert checkpoint["global_step"] == 2
    assert flushed, "training left float32 denormals unflushed"


def test_the_dit_residual_stream_is_in_the_autocast_dtype():
    model = perturb(tiny_dit(), scale=0.1)
    seen = []
    for block in model.blocks:
        block.register_forward_hook(lambda module, inputs, output: seen.append((inputs[0].dtype, output.dtype)))
    x, t, cond = torch.randn(2, 4, 8, 8), torch.rand(2), Conditioning(vector=torch.randn(2, 10))
    model(x, t, cond)
    assert seen == [(torch.float32, torch.float32)] * 2
    seen.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(x, t, cond).float().square().mean().backward()
    assert seen == [(torch.bfloat16, torch.bfloat16)] * 2  # no cast down before and up after each block
    assert all(p.grad.dtype == torch.float32 for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("builder", ["dit", "unet", "unet_linear_projection"])
def test_every_layer_norm_of_the_token_blocks_reads_token_major_memory(builder):
    # elementwise ops keep their input's memory layout: a channels-first view of the tokens (as a convolution
    # writes them) would pass down the whole residual stream, and every layer norm and linear layer would copy it
    model = tiny_dit() if builder == "dit" else UNet(
        in_channels=4, channels=32, channel_mult=[1, 2], num_res_blocks=1, attention_resolutions=[1, 2],
        num_heads=2, context_dim=16, input_size=8, use_linear_projection=builder == "unet_linear_projection")
    norms = [m for m in model.modules() if isinstance(m, nn.LayerNorm)]
    assert len(norms) >= 4
    layouts = []
    for norm in norms:
        norm.register_forward_pre_hook(lambda module, inputs: layouts.append(inputs[0].is_contiguous()))
    cond = Conditioning(vector=torch.randn(2, 10)) if builder == "dit" else Conditioning(tokens=torch.randn(2, 3, 16))
    model(torch.randn(2, 4, 8, 8), torch.rand(2), cond)
    assert layouts == [True] * len(norms)
