"""FLOPs of one call, counted by torch.utils.flop_counter (matmuls, convolutions and attention)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

aten = torch.ops.aten


def _cpu_attention(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _cpu_attention_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


# torch counts the CUDA attention kernels but not the CPU one; without these the attention of every
# CPU step would count as 0 FLOPs (the counter receives shapes, not tensors, for each argument)
CPU_ATTENTION = {
    aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_attention_backward,
}


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call of `fn` (a multiply-add counts 2), forward and backward alike.

    Elementwise work (norms, activations, the optimizer's update) is not counted: MFU relates the
    matmul work to the matmul peak.
    """
    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION) as counter:
        fn()
    return counter.get_total_flops()
