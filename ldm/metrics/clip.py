"""CLIP features from a local open_clip weights file: normalized image embeddings, and captions' for CLIP score."""

from __future__ import annotations

from pathlib import Path

import torch

from ldm.metrics.features import FeatureBackend, require_weights, resize, rgb
from ldm.weights.files import WeightsError

SOURCE = "an open_clip checkpoint of the model named by metrics.clip_model (open_clip_model.safetensors or .bin)"


class ClipFeatures(FeatureBackend):
    """open_clip's `encode_image(normalize=True)` after its own resize and mean/std; `encode_text` for captions.

    `model_name` is an open_clip architecture (e.g. ViT-B-32, or ViT-B-32-quickgelu for OpenAI's weights);
    `vision_cfg` / `text_cfg` / `embed_dim` replace its config (small towers in tests)."""

    name = "clip"
    encodes_text = True

    def __init__(self, weights: str | Path | None = None, model_name: str = "ViT-B-32", vision_cfg: dict | None = None,
                 text_cfg: dict | None = None, embed_dim: int | None = None):
        import open_clip  # deferred: open_clip is heavy, only for this backend

        path = require_weights(weights, self.name, "open_clip_model.safetensors", SOURCE)
        super().__init__(path, {"model_name": model_name})
        overrides = {"vision_cfg": vision_cfg, "text_cfg": text_cfg, "embed_dim": embed_dim}
        overrides = {key: value for key, value in overrides.items() if value is not None}
        if open_clip.get_model_config(model_name) is None:
            raise WeightsError(f"open_clip has no model named {model_name}; see open_clip.list_models()")
        try:
            self.model = open_clip.create_model(model_name, pretrained=str(path), **overrides)
        except RuntimeError as err:
            raise WeightsError(f"{path} does not hold an open_clip {model_name} (with this config): "
                               f"{str(err).splitlines()[0]}") from err
        preprocess = open_clip.get_model_preprocess_cfg(self.model)
        size = preprocess["size"]
        self.image_size = size if isinstance(size, int) else size[0]
        self.register_buffer("mean", torch.tensor(preprocess["mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(preprocess["std"]).view(1, 3, 1, 1), persistent=False)
        self.tokenizer = open_clip.get_tokenizer(model_name, context_length=self.model.context_length)
        self.feature_dim = self.model.visual.output_dim
        self.freeze()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = resize(rgb(images), self.image_size, mode="bicubic").clamp(0, 1)
        return self.model.encode_image((x - self.mean) / self.std, normalize=True)

    def text_alignment(self, images, features: torch.Tensor, captions) -> tuple[torch.Tensor, torch.Tensor]:
        """(image, caption) embeddings of the CLIP score: the image features and the text tower's."""
        return features, self.encode_text(list(captions))

    def encode_text(self, captions: list[str]) -> torch.Tensor:
        """(N, embed_dim) normalized caption embeddings."""
        tokens = self.tokenizer(list(captions)).to(self.mean.device)
        return self.model.encode_text(tokens, normalize=True)
