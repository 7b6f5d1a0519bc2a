"""The standard FID network: torch-fidelity's InceptionV3 with the published TF-ported weights, 2048-d pool features."""

from __future__ import annotations

from pathlib import Path

import torch

from ldm.metrics.features import FeatureBackend, require_weights, rgb
from ldm.weights.files import WeightsError, read_state_dict

#: the file torch-fidelity and pytorch-fid read (the same tensors under both names)
PUBLISHED_FILE = "pt_inception-2015-12-05-6726825d.pth"
#: torch hub names a file by the first hex digits of its SHA-256
PUBLISHED_SHA256_PREFIX = "6726825d"
SOURCE = ("the FID Inception weights in torch-fidelity / pytorch-fid format, released by pytorch-fid as "
          "fid_weights/pt_inception-2015-12-05-6726825d.pth and by torch-fidelity as "
          "weights-inception-2015-12-05-6726825d.pth")


class InceptionFeatures(FeatureBackend):
    """2048-d pool3 features of FID's InceptionV3: uint8 images, resized to 299 the TF1 way by torch-fidelity."""

    name = "inception"
    feature_dim = 2048

    def __init__(self, weights: str | Path | None = None):
        path = require_weights(weights, self.name, PUBLISHED_FILE, SOURCE)
        super().__init__(path)
        # torch-fidelity reads the file with weights_only=False; reading it first with weights_only=True
        # refuses a file that holds anything but tensors before that happens
        read_state_dict(path)
        # deferred: torch-fidelity, only for this backend
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        try:
            self.network = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                                       feature_extractor_weights_path=str(path))
        except RuntimeError as err:
            raise WeightsError(f"{path} does not hold InceptionV3 weights in torch-fidelity / pytorch-fid format "
                               f"({PUBLISHED_FILE}): {str(err).splitlines()[0]}") from err
        self.freeze()

    @property
    def published(self) -> bool:
        return self.weights_sha256.startswith(PUBLISHED_SHA256_PREFIX)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # the published statistics were computed on 8-bit images: the network takes exactly those
        pixels = (rgb(images) * 255).round().clamp(0, 255).to(torch.uint8)
        (features,) = self.network(pixels)
        return features
