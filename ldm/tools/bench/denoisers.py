"""Train steps of the project's denoisers against diffusers' models of the same configuration.

Both sides of a pair get the same batch and do the same step: forward, mean squared error against
a fixed target, backward, and the AdamW update the project's training builds (conf/optimizer/adamw: the fused
kernel where the device has one), so that the ratio compares the networks. Weights are random: with denormal
numbers flushed, as in training, speed does not depend on their values.
"""

from __future__ import annotations

import hydra
import torch
import torch.nn.functional as F

from ldm.conditioners.class_embedder import ClassEmbedder
from ldm.contracts.conditioning import Conditioning
from ldm.tasks.optim import make_optimizer
from ldm.tools.bench.configs import group_config
from ldm.tools.bench.measure import Comparison, Member, parameter_count

DIT_SIZES = ("dit_s", "dit_b", "dit_l", "dit_xl")
NUM_CLASSES = 1000
LATENT_CHANNELS = 4
TEXT_TOKENS, TEXT_WIDTH = 77, 768  # CLIP ViT-L/14's output, what SD 1.x cross-attends to


def adamw(parameters: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """The AdamW update the project's training builds from its default optimizer config."""
    factory = hydra.utils.instantiate(group_config("optimizer", "adamw", lr=1e-4, weight_decay=0.0))
    return make_optimizer(factory, [{"params": parameters}])


def train_step(modules: list[torch.nn.Module], forward, target: torch.Tensor):
    """One step of `forward()` against `target`: MSE, backward, AdamW over the modules' parameters."""
    parameters = [p for module in modules for p in module.parameters()]
    optimizer = adamw(parameters)
    for module in modules:
        module.train()

    def step() -> None:
        loss = F.mse_loss(forward().float(), target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def project_time(t: torch.Tensor, cfg) -> torch.Tensor:
    """The time to give the project's network so that it embeds `t` (diffusers' scale, 0..1000) as diffusers does."""
    return t / cfg.get("time_scale", 1000.0)


def dit_pair(name: str, batch_size: int, device: torch.device, latent_size: int = 32, patch_size: int = 2,
             compile: bool = False, **overrides) -> Comparison:  # noqa: A002 - as model.compile
    """conf/model/<name> (DiT) with a class-embedding lookup against diffusers' DiTTransformer2DModel.

    No learned sigma on either side: 4 output channels on both (the published DiT's 8 would add the
    same small output projection to both)."""
    from diffusers import DiTTransformer2DModel  # deferred: diffusers is heavy and optional

    values = {"input_size": latent_size, "in_channels": LATENT_CHANNELS, "out_channels": None,
              "patch_size": patch_size, "context_dim": None, **overrides}
    cfg = group_config("model", name, **values)
    width = cfg.hidden_size
    model = hydra.utils.instantiate(cfg, vector_dim=width)  # the class vector adds to t's embedding
    # diffusers embeds the class inside the model; here the conditioner does, so its lookup is in the step
    embedder = ClassEmbedder(NUM_CLASSES, width, drop_rate=0.1)
    reference = DiTTransformer2DModel(
        num_attention_heads=cfg.num_heads, attention_head_dim=width // cfg.num_heads,
        in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS, num_layers=cfg.depth, sample_size=latent_size,
        patch_size=patch_size, num_embeds_ada_norm=NUM_CLASSES)
    model, embedder, reference = model.to(device), embedder.to(device), reference.to(device)

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size, LATENT_CHANNELS, latent_size, latent_size, generator=generator).to(device)
    t = 1000 * torch.rand(batch_size, generator=generator).to(device)
    labels = torch.randint(0, NUM_CLASSES, (batch_size,), generator=generator).to(device)
    target = torch.randn(batch_size, LATENT_CHANNELS, latent_size, latent_size, generator=generator).to(device)

    def project_forward():
        return model(x, project_time(t, cfg), Conditioning(vector=embedder(labels)["vector"]))

    def reference_forward():
        return reference(x, timestep=t, class_labels=labels).sample

    return Comparison(
        group="denoisers", name=f"{name}/{patch_size} train step {latent_size}x{latent_size}x{LATENT_CHANNELS}",
        batch_size=batch_size,
        members=[Member("ldm DiT" + (" compiled" if compile else ""),
                        train_step([model, embedder], project_forward, target), parameter_count(model, embedder),
                        prepare=(lambda: setattr(model, "compile_blocks", True)) if compile else None),
                 Member("diffusers DiTTransformer2DModel", train_step([reference], reference_forward, target),
                        parameter_count(reference))],
        note=f"{NUM_CLASSES} classes: the project's step includes the ClassEmbedder lookup; no learned sigma "
             f"({LATENT_CHANNELS} output channels) on either side; "
             f"diffusers re-embeds t and the class in every block (its extra parameters count in AdamW)")


def unet_pair(batch_size: int, device: torch.device, channels: int = 64, latent_size: int = 32,
              compile: bool = False, **overrides) -> Comparison:  # noqa: A002 - as model.compile
    """conf/model/unet_sd (the SD 1.x layout) at width `channels` against diffusers' UNet2DConditionModel."""
    from diffusers import UNet2DConditionModel  # deferred: diffusers is heavy and optional

    values = {"input_size": latent_size, "in_channels": LATENT_CHANNELS, "out_channels": None,
              "vector_dim": None, "context_dim": TEXT_WIDTH, "channels": channels, **overrides}
    cfg = group_config("model", "unet_sd", **values)
    model = hydra.utils.instantiate(cfg)
    levels = len(cfg.channel_mult)
    # the project names the downsampling factors with attention; diffusers names each level's block
    attention = [2**level in set(cfg.attention_resolutions) for level in range(levels)]
    reference = UNet2DConditionModel(
        sample_size=latent_size, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
        block_out_channels=tuple(cfg.channels * m for m in cfg.channel_mult),
        layers_per_block=cfg.num_res_blocks, cross_attention_dim=TEXT_WIDTH,
        # in diffusers' SD 1.x config this number is the count of heads, not their width
        attention_head_dim=cfg.num_heads, transformer_layers_per_block=cfg.transformer_depth,
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)))
    model, reference = model.to(device), reference.to(device)

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size, LATENT_CHANNELS, latent_size, latent_size, generator=generator).to(device)
    t = 1000 * torch.rand(batch_size, generator=generator).to(device)
    tokens = torch.randn(batch_size, TEXT_TOKENS, TEXT_WIDTH, generator=generator).to(device)
    target = torch.randn(batch_size, LATENT_CHANNELS, latent_size, latent_size, generator=generator).to(device)

    def project_forward():
        return model(x, project_time(t, cfg), Conditioning(tokens=tokens))

    def reference_forward():
        return reference(x, t, encoder_hidden_states=tokens).sample

    widths = "-".join(str(cfg.channels * m) for m in cfg.channel_mult)
    return Comparison(
        group="denoisers", name=f"unet_sd {widths} train step {latent_size}x{latent_size}x{LATENT_CHANNELS}",
        batch_size=batch_size,
        members=[Member("ldm UNet" + (" compiled" if compile else ""), train_step([model], project_forward, target),
                        parameter_count(model),
                        prepare=(lambda: setattr(model, "compile_layers", True)) if compile else None),
                 Member("diffusers UNet2DConditionModel", train_step([reference], reference_forward, target),
                        parameter_count(reference))],
        note=f"cross-attention to {TEXT_TOKENS} tokens of width {TEXT_WIDTH} (random, as from a cached text "
             f"encoder), no token mask on either side")


def optimizer_comparison(name: str, device: torch.device) -> Comparison:
    """The AdamW update of conf/model/<name>'s parameters (random gradients): the project's choice against
    torch's default implementation (a loop over tensors on the CPU, foreach on CUDA)."""
    cfg = group_config("model", name, input_size=32, in_channels=LATENT_CHANNELS, out_channels=None, patch_size=2,
                       context_dim=None)
    model = hydra.utils.instantiate(cfg, vector_dim=cfg.hidden_size).to(device)
    generator = torch.Generator().manual_seed(0)
    parameters = list(model.parameters())
    gradients = [torch.randn(p.shape, generator=generator).to(device) * 1e-3 for p in parameters]
    copies = [[p.detach().clone().requires_grad_() for p in parameters] for _ in range(2)]
    optimizers = [adamw(copies[0]), torch.optim.AdamW(copies[1], lr=1e-4, weight_decay=0.0)]

    def update(index: int):
        def step() -> None:
            for parameter, gradient in zip(copies[index], gradients, strict=True):
                parameter.grad = gradient
            optimizers[index].step()
        return step

    fused = bool(optimizers[0].defaults.get("fused"))
    return Comparison(
        group="denoisers", name=f"AdamW update of {name}/2's parameters", batch_size=1,
        members=[Member("ldm AdamW" + (" (fused)" if fused else ""), update(0), parameter_count(model)),
                 Member("torch AdamW default", update(1), parameter_count(model))],
        note="the optimizer alone (the denoiser rows give both sides the project's): what a training script "
             "that builds torch.optim.AdamW with its defaults, as diffusers' do, spends on it")
