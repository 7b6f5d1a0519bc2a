"""`make bench`: training step times measured side by side in one run, reported as ratios.

    python -m ldm.bench [--steps 20] [--batch-size 128] [--threads N]

Pairs: the offline cache against encoding every step (data=digits; data=shapes with the small
frozen text tower of experiment=shapes_text, and with a ViT-B-32-size one), and the small DiT
against the small UNet. Each pair alternates its two members step by
step, so both see the same machine load.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from pathlib import Path
from tempfile import TemporaryDirectory

import hydra
import torch
from hydra import compose, initialize_config_dir

import ldm  # noqa: F401  (registers the config resolvers)
from ldm.build import build_diffusion
from ldm.data.cache import data_identity

CONF = Path(__file__).resolve().parents[1] / "conf"


def setup(overrides: list[str], cache_dir: str):
    """A LatentDiffusion, its optimizer and one training batch for these config overrides."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=overrides + ["paths.output_dir=.", f"data.cache_dir={cache_dir}"])
    module = build_diffusion(cfg)
    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.attach_cache(module.autoencoder, module.conditioner, data_identity(cfg.data))
    module.measure_latent_stats(datamodule.train_dataloader(), max_batches=2)
    batch = next(iter(datamodule.train_dataloader()))
    module.train()
    optimizer = module.configure_optimizers()
    return module, optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer, batch


def step(module, optimizer, batch) -> float:
    start = time.perf_counter()
    loss = module.training_step(batch, 0)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def compare(name: str, a: tuple[str, list[str]], b: tuple[str, list[str]], steps: int, common: list[str],
            cache_dir: str) -> None:
    runs = {label: setup(common + overrides, cache_dir) for label, overrides in (a, b)}
    times: dict[str, list[float]] = {label: [] for label in runs}
    for i in range(steps + 2):
        for label, (module, optimizer, batch) in runs.items():
            elapsed = step(module, optimizer, batch)
            if i >= 2:  # the first steps warm up allocators and kernels
                times[label].append(elapsed)
    (la, ta), (lb, tb) = ((label, statistics.median(t)) for label, t in times.items())
    print(f"{name:<34} {la}: {ta * 1e3:8.1f} ms   {lb}: {tb * 1e3:8.1f} ms   ratio {ta / tb:5.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message=".*self.log.*")  # training_step outside a Trainer
    if args.threads:
        torch.set_num_threads(args.threads)
    common = [f"data.batch_size={args.batch_size}", "logger=none"]
    print(f"median step time over {args.steps} steps, batch {args.batch_size}, {torch.get_num_threads()} threads")
    with TemporaryDirectory() as cache_dir:
        compare("digits, latent DiT: cache", ("no cache", ["data.cache=false"]), ("cache", ["data.cache=true"]),
                args.steps, common, cache_dir)
        # a small shapes set: building the cache runs the frozen tower over every caption once
        text = ["experiment=shapes_text", "data.train.num_samples=512", "data.val.num_samples=64"]
        compare("shapes, frozen text tower: cache", ("no cache", text + ["data.cache=false"]),
                ("cache", text + ["data.cache=true"]), args.steps, common, cache_dir)
        big_text = text + ["conditioner=clip_text", "conditioner.embedders.0.pretrained=null"]
        compare("shapes, ViT-B-32 text tower: cache", ("no cache", big_text + ["data.cache=false"]),
                ("cache", big_text + ["data.cache=true"]), args.steps, common, cache_dir)
        compare("digits denoiser", ("unet", ["model=unet", "data.cache=true"]), ("dit", ["data.cache=true"]),
                args.steps, common, cache_dir)


if __name__ == "__main__":
    main()
