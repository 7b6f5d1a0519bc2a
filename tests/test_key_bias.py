"""The key part of a fused attention bias: softmax ignores q.b_k (the same for all of a query's logits), so its
true gradient is 0. Backward leaves it out, so AdamW cannot turn rounding noise into steps of size lr on it:
the key bias stays at its initial or loaded value, and the attention's output is unchanged."""

from __future__ import annotations

import torch
from conftest import TINY, train_run

from ldm.models.layers import Attention
from ldm.utils.checkpoint import load_checkpoint


def test_backward_gives_the_key_bias_no_gradient_under_bf16_autocast():
    torch.manual_seed(0)
    dim = 32
    self_attention, cross_attention = Attention(dim, 4), Attention(dim, 4, context_dim=16)
    for layer in (self_attention, cross_attention):
        torch.nn.init.normal_(layer.to_out.weight)
    x, context = torch.randn(2, 8, dim), torch.randn(2, 5, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = self_attention(x).float().square().sum() + cross_attention(x, context).float().square().sum()
    loss.backward()
    qkv, kv = self_attention.to_qkv.bias.grad, cross_attention.to_kv.bias.grad
    assert torch.count_nonzero(qkv[dim:2 * dim]) == 0 and torch.count_nonzero(kv[:dim]) == 0
    # the query and value parts, and the key weights, do learn
    assert qkv[:dim].abs().max() > 0 and qkv[2 * dim:].abs().max() > 0 and kv[dim:].abs().max() > 0
    assert self_attention.to_qkv.weight.grad[dim:2 * dim].abs().max() > 0


def test_the_output_is_that_of_the_plain_projection_with_the_key_bias():
    torch.manual_seed(1)
    layer = Attention(32, 4)
    torch.nn.init.normal_(layer.to_qkv.bias)
    x = torch.randn(2, 8, 32)
    q, k, v = (torch.nn.functional.linear(x, layer.to_qkv.weight, layer.to_qkv.bias)
               .unflatten(-1, (3, 4, 8)).permute(2, 0, 3, 1, 4))
    expected = layer.to_out(torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)


def test_training_at_the_default_precision_leaves_every_key_bias_where_it_started(tmp_path):
    train_run(TINY + ["logger=none", "callbacks.sample_grid=null", "callbacks.sample_metrics=null",
                      "trainer.max_steps=20", "trainer.val_check_interval=20"], tmp_path)
    state = load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")["state_dict"]
    biases = {name: value for name, value in state.items() if name.endswith("to_qkv.bias")}
    assert biases
    for name, bias in biases.items():
        dim = bias.shape[0] // 3
        assert torch.count_nonzero(bias[dim:2 * dim]) == 0, name  # initialized to 0, never moved
        assert bias[:dim].abs().max() > 0, name  # the query bias trained
