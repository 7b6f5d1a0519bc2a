"""Train the shipped feature networks: `python -m ldm.tools.train_features [--only digits|shapes]`.

Each is a classifier on the project's own embedded data (training split only, small random shifts),
seeded and deterministic; the weights, architecture and validation accuracies go to
ldm/metrics/weights/NAME.safetensors, written atomically. Both take under a minute on two CPU cores.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ldm.data import cache_file
from ldm.data.digits import DigitsDataset
from ldm.data.shapes import ShapesDataset
from ldm.metrics.project_features import SPECS, WEIGHTS_DIR, FeatureNet, architecture

SEED = 0
MAX_SHIFT = 2  # pixels: generated samples are rarely centred exactly like the data
# per data set: training items, epochs, batch size, learning rate
SETTINGS = {
    "digits": {"epochs": 15, "batch_size": 64, "lr": 2e-3},
    "shapes": {"train_items": 6000, "val_items": 1000, "epochs": 6, "batch_size": 64, "lr": 2e-3},
}


def load_split(name: str, split: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Images (N, C, 32, 32) in [-1, 1] and integer targets per head."""
    if name == "digits":
        data = DigitsDataset(split, image_size=32)
        return data.images, {"label": data.labels}
    data = ShapesDataset(split, num_samples=SETTINGS[name][f"{split}_items"], image_size=32)
    images = torch.stack([data[i]["image"] for i in range(len(data))])
    return images, {key: torch.from_numpy(values) for key, values in data.attributes.items()}


def shift(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each image moved by a random whole number of pixels, the background (-1) filling in."""
    padded = F.pad(images, [MAX_SHIFT] * 4, value=-1.0)
    size = images.shape[-1]
    offsets = torch.randint(0, 2 * MAX_SHIFT + 1, (len(images), 2), generator=generator)
    return torch.stack([p[:, dy:dy + size, dx:dx + size] for p, (dy, dx) in zip(padded, offsets.tolist(), strict=True)])


@torch.no_grad()
def accuracy(net: FeatureNet, images: torch.Tensor, targets: dict[str, torch.Tensor]) -> dict[str, float]:
    logits = torch.cat([torch.cat(list(net(chunk).values()), dim=1) for chunk in images.split(500)])
    scores, start = {}, 0
    for name, head in net.heads.items():
        predicted = logits[:, start:start + head.out_features].argmax(1)
        scores[name] = float((predicted == targets[name]).float().mean())
        start += head.out_features
    return scores


@torch.no_grad()
def set_feature_scales(net: FeatureNet, images: torch.Tensor) -> None:
    """Scale each stage's features to unit total variance over the training images."""
    pooled = torch.cat([net.pooled(chunk) for chunk in images.split(500)]).double()
    variances = pooled.var(dim=0).split([stage[0].out_channels for stage in net.stages])
    net.feature_scales.copy_(torch.stack([v.sum() for v in variances]).rsqrt().float())


def train(name: str, epochs: int | None = None, log=print) -> tuple[FeatureNet, dict]:
    """One network, trained from seed SEED; returns it with its record (settings, accuracies, seconds)."""
    settings = SETTINGS[name] | ({"epochs": epochs} if epochs is not None else {})
    torch.manual_seed(SEED)
    generator = torch.Generator().manual_seed(SEED)
    started = time.monotonic()
    images, targets = load_split(name, "train")
    val_images, val_targets = load_split(name, "val")
    net = FeatureNet(SPECS[name]["channels"], SPECS[name]["heads"])
    optimizer = torch.optim.Adam(net.parameters(), lr=settings["lr"])
    steps = settings["epochs"] * -(-len(images) // settings["batch_size"])
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, settings["lr"], total_steps=steps)
    for epoch in range(settings["epochs"]):
        net.train()
        for index in torch.randperm(len(images), generator=generator).split(settings["batch_size"]):
            logits = net(shift(images[index], generator))
            loss = sum(F.cross_entropy(logits[key], targets[key][index]) for key in logits)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        net.eval()
        log(f"{name}: epoch {epoch + 1}/{settings['epochs']} loss {loss.item():.4f} "
            f"val {accuracy(net, val_images, val_targets)} ({time.monotonic() - started:.0f} s)")
    set_feature_scales(net, images)
    record = {"seed": SEED, **settings, "train_items": len(images), "val_items": len(val_images),
              "train_accuracy": accuracy(net, images, targets), "val_accuracy": accuracy(net, val_images, val_targets),
              "seconds": round(time.monotonic() - started, 1)}
    return net, record


def save(net: FeatureNet, record: dict, path: Path) -> None:
    tensors = {key: value.detach().contiguous() for key, value in net.state_dict().items()}
    metadata = {"architecture": json.dumps(architecture(net)), "record": json.dumps(record)}
    cache_file.write(path, tensors, metadata)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=sorted(SPECS), help="train one network (default: all)")
    parser.add_argument("--out", type=Path, default=WEIGHTS_DIR, help="folder for NAME.safetensors")
    args = parser.parse_args(argv)
    torch.use_deterministic_algorithms(True)  # the same file from the same machine, run after run
    for name in [args.only] if args.only else sorted(SPECS):
        net, record = train(name)
        save(net, record, args.out / f"{name}.safetensors")
        print(f"{name}: wrote {args.out / f'{name}.safetensors'}: {json.dumps(record)}")


if __name__ == "__main__":
    main()
