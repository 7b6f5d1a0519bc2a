"""Layers shared by the denoisers: timestep embedding, attention, adaLN modulation, feed-forward."""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ldm.utils.errors import ConfigError


def zero_init(module: nn.Module) -> nn.Module:
    """Zero a module's parameters, so that a residual branch starts as the identity."""
    for parameter in module.parameters():
        nn.init.zeros_(parameter)
    return module


def run_layer(layer: nn.Module, *args, checkpointing: bool = False):
    """Call `layer`, recomputing its activations in backward when checkpointing while training."""
    if checkpointing and layer.training and torch.is_grad_enabled():
        return checkpoint(layer, *args, use_reentrant=False)
    return layer(*args)


def compile_problem(device: torch.device) -> str | None:
    """Why torch.compile cannot build kernels for `device` on this machine, or None when it can."""
    if not torch._dynamo.is_dynamo_supported():
        return f"torch.compile does not support Python {sys.version.split()[0]} on {sys.platform}"
    if device.type == "cuda":
        from torch.utils._triton import has_triton  # deferred: torch's compiler stack is heavy

        return None if has_triton() else "its CUDA kernels need Triton, which is not installed"
    if device.type == "cpu":
        from torch._inductor.cpp_builder import get_cpp_compiler  # deferred: torch's compiler stack is heavy

        try:
            get_cpp_compiler()
        except Exception as error:  # noqa: BLE001 - any failure to find one means the same to the user
            return f"its CPU kernels need a C++ compiler (g++ or clang++, or $CXX), and none was found ({error})"
    return None


def compile_each(modules: Iterable[nn.Module], device: torch.device) -> None:
    """Compile every module in place, each its own region: a block's code compiles once for all blocks of its
    kind and shape (again for train/eval, grad mode or a new batch size), which keeps compile time short."""
    modules = list(modules)
    problem = compile_problem(device)
    if problem:
        raise ConfigError([f"model.compile=true: torch.compile cannot run on {device} here: {problem}; "
                           "set model.compile=false"])
    # the modules of one class share their code, and torch keeps 8 graphs per code by default: a UNet's
    # blocks differ in shape, so allow one graph per module on top
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, len(modules) + 8)
    for module in modules:
        # fixed shapes: inductor failed on the UNet's convolutions with symbolic ones (torch 2.14)
        module.compile(dynamic=False)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0,
                       frequency_shift: float = 0.0) -> torch.Tensor:
    """Sinusoidal embedding (B,) -> (B, dim), [cos | sin], in float32: frequencies max_period^(-i / (half - shift)).

    Shift 0 is the transformer's position encoding (and the published DiT code); diffusers' DiT uses 1.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32)
                      / (half - frequency_shift))
    args = t.float()[:, None] * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = F.pad(embedding, (0, 1))
    return embedding


class TimestepEmbedder(nn.Module):
    """t -> sinusoidal features of `t * time_scale` -> MLP to `dim`.

    The scale maps t in [0, 1] to DDPM's step range, where the sinusoid frequencies were designed
    (1 for a time input that already is the level k); `frequency_shift` as in `timestep_embedding`.
    """

    def __init__(self, dim: int, frequency_dim: int = 256, time_scale: float = 1000.0,
                 frequency_shift: float = 0.0):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.time_scale = time_scale
        self.frequency_shift = frequency_shift
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        features = timestep_embedding(t * self.time_scale, self.frequency_dim, frequency_shift=self.frequency_shift)
        return self.mlp(features.to(self.mlp[0].weight.dtype))


def vector_embedder(vector_dim: int, dim: int) -> nn.Module:
    """Projects Conditioning.vector to the embedding width; no layer when the widths already agree."""
    return nn.Identity() if vector_dim == dim else nn.Linear(vector_dim, dim)


def broadcast_time(t: torch.Tensor | float, batch_size: int, device) -> torch.Tensor:
    """Accept t as (B,), a one-element tensor or a float; return a (B,) tensor."""
    t = torch.as_tensor(t, device=device)
    if t.numel() == 1:
        t = t.reshape(1).expand(batch_size)
    if t.shape != (batch_size,):
        raise ValueError(f"t must have shape ({batch_size},), got {tuple(t.shape)}")
    return t


def in_autocast_dtype(x: torch.Tensor) -> torch.Tensor:
    """`x` in the dtype autocast computes in on its device (unchanged outside autocast).

    A residual stream kept in this dtype is added to each branch's output as it comes (autocast's matmuls
    return that dtype) instead of being cast down before and up after every layer: a float32 stream under bf16
    autocast costs a DiT-S/2 train step ~150 activation-sized casts and made it ~10% slower on the CPU.
    """
    device = x.device.type
    if torch.is_autocast_enabled(device) and x.is_floating_point():
        return x.to(torch.get_autocast_dtype(device))
    return x


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x (B, N, D) scaled and shifted per sample by (B, 1, D) modulations, x * (1 + scale) + shift."""
    return torch.addcmul(shift, x, 1 + scale)  # one pass over x, where `*` then `+` take two


class AdaLNModulation(nn.Module):
    """Regresses `num_chunks` per-sample (B, 1, dim) modulations from the conditioning embedding.

    Zero-initialized (adaLN-Zero): shifts, scales and gates all start at 0.
    """

    def __init__(self, cond_dim: int, dim: int, num_chunks: int):
        super().__init__()
        self.num_chunks = num_chunks
        self.proj = zero_init(nn.Linear(cond_dim, num_chunks * dim))

    def forward(self, c: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.proj(F.silu(c)).unsqueeze(1).chunk(self.num_chunks, dim=-1)


def split_heads(projected: torch.Tensor, parts: int, num_heads: int) -> tuple[torch.Tensor, ...]:
    """(B, N, parts * heads * d) -> `parts` views of shape (B, heads, N, d), each with unit stride in d.

    Views, not copies: the SDPA kernels (CPU flash, CUDA flash and memory-efficient) take these strides as
    they are, so one fused projection feeds attention without a copy.
    """
    return projected.unflatten(-1, (parts, num_heads, -1)).permute(2, 0, 3, 1, 4).unbind(0)


# On the CPU in bf16, attention with explicit matmuls and softmax trains faster than the CPU flash kernel
# (whose bf16 path is slow: 1.2x to 9x slower, measured on DiT and UNet shapes) while one head's
# attention matrix is at most this many entries; beyond, the flash kernel's tiling wins. In float32 the
# flash kernel always won.
EXPLICIT_ATTENTION_ENTRIES = 2**17
# ... and while all heads' matrices of the batch (which backward keeps) hold at most this many entries: a
# DiT-B/2 train step at batch 16 (12.6M entries) was 1.2x faster on the flash kernel, DiT-S/2 at batch 16
# (6.3M) 1.14x faster explicit
EXPLICIT_ATTENTION_MEMORY = 2**23


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v of (B, heads, N, d) queries and (B, heads, L, d) keys and values; `mask`
    (B, 1, 1, L) bool, True = attend, or None.

    scaled_dot_product_attention (flash or memory-efficient kernels on CUDA), except for small matrices on
    the CPU in bf16, where explicit matmuls are faster (see EXPLICIT_ATTENTION_ENTRIES).
    """
    entries = q.shape[-2] * k.shape[-2]
    if (q.device.type == "cpu" and q.dtype == torch.bfloat16 and entries <= EXPLICIT_ATTENTION_ENTRIES
            and q.shape[:-2].numel() * entries <= EXPLICIT_ATTENTION_MEMORY):
        weights = (q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)
        if mask is not None:
            weights = weights.masked_fill(~mask, float("-inf"))
        return weights.softmax(dim=-1) @ v
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class Attention(nn.Module):
    """Multi-head attention (see `attention`): self-attention (`context_dim` None, one fused `to_qkv`
    projection), or cross-attention to a context of width `context_dim` (`to_q`, and a fused `to_kv`) with an
    optional key mask (B, L), True = attend."""

    def __init__(self, dim: int, num_heads: int, context_dim: int | None = None, qkv_bias: bool = True,
                 zero_out: bool = False):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"attention width {dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.is_cross = context_dim is not None
        if self.is_cross:
            self.to_q = nn.Linear(dim, dim, bias=qkv_bias)
            self.to_kv = nn.Linear(context_dim, 2 * dim, bias=qkv_bias)
        else:
            self.to_qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)  # rows [q | k | v], each head-major
        self.to_out = nn.Linear(dim, dim)
        if zero_out:
            zero_init(self.to_out)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        dim = self.to_out.in_features
        if self.is_cross:
            (q,) = split_heads(self.to_q(x), 1, self.num_heads)
            k, v = split_heads(key_bias_frozen(self.to_kv, context, 0, dim), 2, self.num_heads)
        else:
            if context is not None or mask is not None:
                raise ValueError("a self-attention layer takes no context or mask; build it with context_dim")
            q, k, v = split_heads(key_bias_frozen(self.to_qkv, x, dim, 2 * dim), 3, self.num_heads)
        if mask is None:  # no mask tensor at all, so that CUDA can pick the flash kernel
            out = attention(q, k, v)
        else:
            mask = mask.bool()
            # a sample whose keys are all masked would get NaN weights; let it attend anywhere and
            # zero its output below, so it behaves as "no context"
            has_keys = mask.any(dim=-1)
            out = attention(q, k, v, (mask | ~has_keys[:, None])[:, None, None, :])
            out = out * has_keys[:, None, None, None].to(out.dtype)
        # the SDPA kernels write (B, N, heads, d) memory, so this is a view there
        return self.to_out(out.transpose(1, 2).flatten(2))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if not self.is_cross:  # checkpoints of earlier versions hold to_q and to_kv apart
            fuse_qkv_keys(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def key_bias_frozen(linear: nn.Linear, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """`linear(x)` with the bias rows [start, stop) (the keys') left out of backward.

    A key bias adds q.b_k to all of a query's logits, which softmax ignores: its true gradient is 0, and what
    backward computes for it is rounding noise (~1e-7 per element under bf16 autocast, above Adam's eps), which
    Adam turns into steps of ~lr. Kept as a parameter (checkpoints and published weights hold it), it stays at
    its initial or loaded value."""
    bias = linear.bias
    if bias is None or not bias.requires_grad or not torch.is_grad_enabled():
        return linear(x)
    return F.linear(x, linear.weight, torch.cat([bias[:start], bias[start:stop].detach(), bias[stop:]]))


def fuse_qkv_keys(state_dict: dict, prefix: str) -> None:
    """Rewrite, in place, a self-attention's older `to_q` + `to_kv` tensors under `prefix` as one `to_qkv`."""
    for suffix in ("weight", "bias"):
        q, kv = f"{prefix}to_q.{suffix}", f"{prefix}to_kv.{suffix}"
        if q in state_dict and kv in state_dict:
            state_dict[f"{prefix}to_qkv.{suffix}"] = torch.cat([state_dict.pop(q), state_dict.pop(kv)])


def fuse_attention_keys(model: nn.Module, state_dict: dict, prefix: str = "") -> dict:
    """A copy of `state_dict` (of `model`, keys under `prefix`) with every self-attention's `to_q` + `to_kv`
    fused: for weight dictionaries that do not pass through `load_state_dict` (EMA averages)."""
    state_dict = dict(state_dict)
    for name, module in model.named_modules():
        if isinstance(module, Attention) and not module.is_cross:
            fuse_qkv_keys(state_dict, f"{prefix}{name}." if name else prefix)
    return state_dict


class GEGLU(nn.Module):
    """Gated GELU projection (Shazeer, 2020): a * gelu(b) of one linear layer's two halves."""

    def __init__(self, dim: int, inner_dim: int):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * inner_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    """Transformer MLP: GEGLU (`glu=True`) or Linear + tanh-GELU, then Linear back to `dim`."""

    def __init__(self, dim: int, mult: float = 4.0, glu: bool = False, dropout: float = 0.0):
        super().__init__()
        inner_dim = int(dim * mult)
        project_in = GEGLU(dim, inner_dim) if glu else nn.Sequential(
            nn.Linear(dim, inner_dim), nn.GELU(approximate="tanh"))
        self.net = nn.Sequential(project_in, nn.Dropout(dropout), nn.Linear(inner_dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
