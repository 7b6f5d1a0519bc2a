"""Sampling throughput: every sampler of conf/sampler/ at the same number of network calls (NFE), and
classifier-free guidance's one batched call against two calls per step."""

from __future__ import annotations

import hydra
import torch
from omegaconf import DictConfig

from ldm.conditioners.class_embedder import ClassEmbedder
from ldm.contracts.conditioning import Conditioning
from ldm.guidance import classifier_free_guidance
from ldm.tools.bench.configs import CONF, group_config, train_config
from ldm.tools.bench.denoisers import LATENT_CHANNELS
from ldm.tools.bench.measure import Comparison, Member, parameter_count

BASELINE = "euler"  # the plainest sampler: the others' ratios are their overhead (or saving) against it


def sampler_config(schedule: str, sampler: str) -> DictConfig:
    """The train config with this schedule and sampler."""
    return train_config([f"schedule={schedule}", f"sampler={sampler}"])


def samplers(schedule: str) -> dict[str, tuple[object, object]]:
    """{name: (parameterization, sampler)} for each sampler config, the baseline first; aliases left out."""
    built, seen = {}, set()
    names = sorted(p.stem for p in (CONF / "sampler").glob("*.yaml"))
    for name in [BASELINE] + [n for n in names if n != BASELINE]:
        cfg = sampler_config(schedule, name)
        key = str(sorted(cfg.sampler.items()))  # sampler=ddpm is another name of sampler=ancestral
        if key not in seen:
            seen.add(key)
            built[name] = (hydra.utils.instantiate(cfg.schedule), hydra.utils.instantiate(cfg.sampler))
    return built


def steps_for(sampler, nfe: int) -> int:
    """The most steps whose network calls do not pass `nfe`."""
    steps = 1
    while sampler.calls(steps + 1) <= nfe:
        steps += 1
    return steps


def sampling_model(name: str, device: torch.device, latent_size: int):
    """A class-conditional denoiser of conf/model/<name> in eval mode, with the class embedding it adds."""
    cfg = group_config("model", name, input_size=latent_size, in_channels=LATENT_CHANNELS, out_channels=None,
                       context_dim=None)
    model = hydra.utils.instantiate(cfg, vector_dim=cfg.hidden_size).to(device).eval()
    embedder = ClassEmbedder(1000, cfg.hidden_size).to(device).eval()
    return model, embedder


def _inputs(embedder, batch_size: int, latent_size: int, device: torch.device):
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(batch_size, LATENT_CHANNELS, latent_size, latent_size, generator=generator).to(device)
    labels = torch.randint(0, 1000, (batch_size,), generator=generator).to(device)
    with torch.no_grad():
        cond = Conditioning(**embedder(labels))
        uncond = Conditioning(**embedder.null(batch_size, device))
    return noise, cond, uncond


def samplers_comparison(batch_size: int, device: torch.device, nfe: int = 9, schedule: str = "flow",
                        model_name: str = "dit", latent_size: int = 32) -> Comparison:
    """One sampling run (batch of images) per sampler, all at `nfe` network calls or just under."""
    model, embedder = sampling_model(model_name, device, latent_size)
    noise, cond, _ = _inputs(embedder, batch_size, latent_size, device)
    members = []
    for name, (parameterization, sampler) in samplers(schedule).items():
        steps = steps_for(sampler, nfe)

        def model_fn(x, t, p=parameterization):
            return model(*p.model_input(x, t), cond)

        def run(sampler=sampler, p=parameterization, steps=steps):
            generator = torch.Generator().manual_seed(1)
            return sampler(model_fn, noise, p, steps, generator=generator)

        members.append(Member(f"{name} ({steps} steps, NFE {sampler.calls(steps)})", run,
                              parameter_count(model)))
    return Comparison(
        group="sampling", name=f"samplers at NFE {nfe}, model={model_name} {latent_size}x{latent_size}, "
                               f"schedule={schedule}",
        batch_size=batch_size, members=members, rows=[(0, None)] + [(i, 0) for i in range(1, len(members))],
        note=f"one sampling run of the batch per step; ratios against {BASELINE}")


def guidance_comparison(batch_size: int, device: torch.device, nfe: int = 9, scale: float = 3.0,
                        schedule: str = "flow", model_name: str = "dit", latent_size: int = 32) -> Comparison:
    """classifier_free_guidance (both halves in one call of twice the batch) against two calls per step."""
    model, embedder = sampling_model(model_name, device, latent_size)
    noise, cond, uncond = _inputs(embedder, batch_size, latent_size, device)
    cfg = sampler_config(schedule, BASELINE)
    parameterization, sampler = hydra.utils.instantiate(cfg.schedule), hydra.utils.instantiate(cfg.sampler)

    def network(x, t, conditioning):
        return model(*parameterization.model_input(x, t), conditioning)

    batched = classifier_free_guidance(network, cond, uncond, scale=scale)

    def two_calls(x, t):
        pred_cond, pred_uncond = network(x, t, cond), network(x, t, uncond)
        return pred_uncond + scale * (pred_cond - pred_uncond)

    def run(model_fn):
        return lambda: sampler(model_fn, noise, parameterization, nfe)

    return Comparison(
        group="sampling", name=f"guidance scale {scale}, {BASELINE} {nfe} steps, model={model_name}",
        batch_size=batch_size,
        members=[Member("one batched call", run(batched), parameter_count(model)),
                 Member("two calls", run(two_calls), parameter_count(model))],
        note="classifier_free_guidance's call on the doubled batch against a conditional and an "
             "unconditional call")
