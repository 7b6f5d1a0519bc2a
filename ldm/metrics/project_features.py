"""Feature networks the project trains on its own data (`python -m ldm.tools.train_features`) and ships.

One small CNN per data set, a classifier with a linear head per attribute (digits: the label; shapes:
shape, color, position, size); the heads judge whether a sample shows what its label or caption asked
for. The features are the heads' input, the penultimate layer: every conv stage's channel means, each
stage scaled to unit variance on the training data. A classifier's last hidden layer alone hardly moves
under noise or blur; early stages do, late stages see which digits or shapes there are.
Weights and architecture live in ldm/metrics/weights/NAME.safetensors.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from ldm.data.shapes import parse_caption
from ldm.metrics.features import FeatureBackend, resize
from ldm.utils.errors import UserError
from ldm.weights.files import WeightsError, load_mapped

WEIGHTS_DIR = Path(__file__).parent / "weights"
#: per data set: image channels and the classifier heads (attribute -> number of classes)
SPECS = {
    "digits": {"channels": 1, "heads": {"label": 10}},
    "shapes": {"channels": 3, "heads": {"shape": 3, "color": 7, "position": 5, "size": 2}},
}


class FeatureNet(nn.Module):
    """Conv stages (each halving the size) on the image and two coordinate channels; the features are every stage's
    channels averaged over the image, as Inception's pool features, and each head is linear on them.

    The coordinate channels let averaged features still say where things are (the shapes' position)."""

    def __init__(self, channels: int, heads: dict[str, int], widths: tuple[int, ...] = (16, 32, 64, 128),
                 image_size: int = 32):
        super().__init__()
        self.image_size = image_size
        self.stages, width_in = nn.ModuleList(), channels + 2
        for width in widths:
            self.stages.append(nn.Sequential(nn.Conv2d(width_in, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                                             nn.MaxPool2d(2)))
            width_in = width
        # per stage, a factor giving its features unit total variance on the training data (set after training),
        # so that the Fréchet distance weighs fine detail (early stages) and content (late stages) alike
        self.register_buffer("feature_scales", torch.ones(len(widths)))
        self.heads = nn.ModuleDict({name: nn.Linear(sum(widths), classes) for name, classes in heads.items()})

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, S, S) in [-1, 1] -> (N, sum(widths)): each stage's channel means, the input of every head."""
        line = torch.linspace(-1, 1, x.shape[-1], device=x.device, dtype=x.dtype)
        coords = torch.stack(torch.meshgrid(line, line, indexing="ij")).expand(len(x), -1, -1, -1)
        h, means = torch.cat([x, coords], dim=1), []
        for stage in self.stages:
            h = stage(h)
            means.append(h.mean(dim=(2, 3)))
        return torch.cat(means, dim=1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled features, each stage scaled by its `feature_scales` entry."""
        widths = [stage[0].out_channels for stage in self.stages]
        return self.pooled(x) * self.feature_scales.repeat_interleave(torch.tensor(widths, device=x.device))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        pooled = self.pooled(x)
        return {name: head(pooled) for name, head in self.heads.items()}


def architecture(net: FeatureNet) -> dict:
    """What `FeatureNet(**architecture)` needs to rebuild `net` (stored in the weights file's metadata)."""
    return {"channels": net.stages[0][0].in_channels - 2, "heads": {k: h.out_features for k, h in net.heads.items()},
            "widths": [stage[0].out_channels for stage in net.stages], "image_size": net.image_size}


def read_feature_net(path: Path) -> tuple[FeatureNet, dict[str, str]]:
    """A FeatureNet and the file's metadata (architecture, training record)."""
    try:
        with safe_open(str(path), framework="pt") as file:
            metadata = dict(file.metadata() or {})
            state = {key: file.get_tensor(key) for key in file.keys()}
        arch = json.loads(metadata["architecture"])
    except (SafetensorError, OSError, KeyError, json.JSONDecodeError) as err:
        raise WeightsError(f"{path} is not a feature network written by `python -m ldm.tools.train_features` "
                           f"({type(err).__name__}: {err}); rebuild it with that command") from err
    net = FeatureNet(arch["channels"], arch["heads"], tuple(arch["widths"]), arch["image_size"])
    load_mapped(net, state, path)
    return net, metadata


class ProjectFeatures(FeatureBackend):
    """The shipped network of data set `name` (digits | shapes), or the FeatureNet file `weights`."""

    def __init__(self, name: str = "digits", weights: str | Path | None = None):
        if name not in SPECS:
            raise UserError(f"no project feature network for data set '{name}': choose one of {', '.join(SPECS)}")
        path = Path(weights).expanduser() if weights is not None else WEIGHTS_DIR / f"{name}.safetensors"
        if not path.is_file():
            raise WeightsError(f"feature network {path} does not exist: build it with "
                               "`python -m ldm.tools.train_features` (make features)")
        super().__init__(path)
        self.name = name
        self.network, metadata = read_feature_net(path)
        self.record = {key: value for key, value in metadata.items() if key != "architecture"}
        self.channels = SPECS[name]["channels"]
        if self.network.heads.keys() != SPECS[name]["heads"].keys():
            raise WeightsError(f"{path} has heads {sorted(self.network.heads)}, the {name} network has "
                               f"{sorted(SPECS[name]['heads'])}")
        self.feature_dim = sum(stage[0].out_channels for stage in self.network.stages)
        self.encodes_text = name == "shapes"
        self.freeze()

    @property
    def heads(self) -> dict[str, int]:
        return {name: head.out_features for name, head in self.network.heads.items()}

    def _network_input(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[1] != self.channels:
            raise UserError(f"the {self.name} feature network takes {self.channels}-channel images, got "
                            f"{images.shape[1]} channels: choose the metrics backend of the data set")
        return resize(images, self.network.image_size, mode="bilinear") * 2 - 1

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.network.features(self._network_input(images))

    def classify(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits (N, classes) per attribute."""
        return self.network(self._network_input(images))

    def text_alignment(self, images, features, captions) -> tuple[torch.Tensor, torch.Tensor]:
        """The CLIP score's (image, caption) embeddings in the classifier's attribute space (shapes): per attribute
        the predicted class probabilities against the caption's one-hot class (uniform where it names none), so
        that 100 * cosine is 100 when every attribute is recognized with certainty as the one asked for."""
        targets = self.targets(captions=captions)
        image_parts, text_parts = [], []
        for name, logits in self.classify(images).items():
            image_parts.append(logits.float().softmax(-1))
            asked = targets[name].to(logits.device)
            text = torch.full_like(image_parts[-1], 1 / logits.shape[-1])
            named = asked >= 0
            text[named] = torch.nn.functional.one_hot(asked[named], logits.shape[-1]).float()
            text_parts.append(text)
        return torch.cat(image_parts, dim=-1), torch.cat(text_parts, dim=-1)

    def targets(self, labels=None, captions=None) -> dict[str, torch.Tensor] | None:
        """What each sample was asked to show, per attribute (-1: not asked); None when nothing was asked."""
        if self.name == "digits" and labels is not None:
            return {"label": torch.as_tensor(labels).long().reshape(-1)}
        if self.name == "shapes" and captions is not None:
            parsed = [parse_caption(str(caption)) for caption in captions]
            return {name: torch.tensor([p[name] for p in parsed]) for name in self.heads}
        return None
