"""The published feature networks (Inception, DINOv2, open_clip) on random weights saved in their own file
layouts: the same features as the reference implementations, and errors that name the file to provide."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ldm.metrics.suite import MetricSuite, build_suite
from ldm.weights.files import WeightsError


def random_images(n: int, channels: int = 3, size: int = 32, seed: int = 0) -> torch.Tensor:
    """float (N, C, S, S) in [-1, 1], like samples."""
    return torch.rand(n, channels, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_inception_backend_reads_the_torch_fidelity_layout(tmp_path, monkeypatch):
    import torchvision
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    from ldm.metrics import inception

    torch.manual_seed(0)
    # torchvision's InceptionV3 without its auxiliary head and with 1008 classes has the published file's keys
    network = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=False, num_classes=1008)
    path = tmp_path / inception.PUBLISHED_FILE
    torch.save(network.state_dict(), path)
    backend = inception.InceptionFeatures(path)
    images = random_images(2, channels=1)
    features = backend((images + 1) / 2)
    reference = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path))
    uint8 = ((images + 1) * 127.5).round().to(torch.uint8).expand(-1, 3, -1, -1)
    assert features.shape == (2, 2048) and torch.equal(features, reference(uint8)[0])
    # named fid only with the published weights (their SHA-256 starts with the hash in the file name)
    suite = MetricSuite(backend, ["fd"])
    assert not backend.published and suite.metric_name("fd") == "fd_inception"
    monkeypatch.setattr(inception, "PUBLISHED_SHA256_PREFIX", backend.weights_sha256[:8])
    assert backend.published and suite.metric_name("fd") == "fid" and suite.metric_name("kid") == "kid"


def test_missing_weights_name_the_file_and_the_key(tmp_path):
    from ldm.metrics.clip import ClipFeatures
    from ldm.metrics.dinov2 import DinoV2Features
    from ldm.metrics.inception import InceptionFeatures

    cases = [(InceptionFeatures, "pt_inception-2015-12-05-6726825d.pth", "metrics.weights.inception="),
             (DinoV2Features, "dinov2_vitl14_pretrain.pth", "metrics.weights.dinov2="),
             (ClipFeatures, "open_clip", "metrics.weights.clip=")]
    for backend, file_name, key in cases:
        for weights in (None, tmp_path / "absent.pth"):
            with pytest.raises(WeightsError, match=file_name) as error:
                backend(weights)
            assert key in str(error.value)
    with pytest.raises(WeightsError, match="train_features"):
        build_suite("digits", weights={"digits": str(tmp_path / "absent.safetensors")})


def official_dinov2_state(dim: int, depth: int, grid: int, swiglu: bool, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors under the key names and shapes of dinov2_vit*14_pretrain.pth (hidden as DINOv2 sizes it)."""
    generator = torch.Generator().manual_seed(seed)
    hidden = (int(4 * dim * 2 / 3) + 7) // 8 * 8 if swiglu else 4 * dim
    shapes = {"cls_token": (1, 1, dim), "pos_embed": (1, 1 + grid * grid, dim), "mask_token": (1, dim),
              "patch_embed.proj.weight": (dim, 3, 14, 14), "patch_embed.proj.bias": (dim,),
              "norm.weight": (dim,), "norm.bias": (dim,)}
    for i in range(depth):
        block = {"norm1.weight": (dim,), "norm1.bias": (dim,), "attn.qkv.weight": (3 * dim, dim),
                 "attn.qkv.bias": (3 * dim,), "attn.proj.weight": (dim, dim), "attn.proj.bias": (dim,),
                 "ls1.gamma": (dim,), "norm2.weight": (dim,), "norm2.bias": (dim,), "ls2.gamma": (dim,)}
        block.update({"mlp.w12.weight": (2 * hidden, dim), "mlp.w12.bias": (2 * hidden,),
                      "mlp.w3.weight": (dim, hidden), "mlp.w3.bias": (dim,)} if swiglu else
                     {"mlp.fc1.weight": (hidden, dim), "mlp.fc1.bias": (hidden,),
                      "mlp.fc2.weight": (dim, hidden), "mlp.fc2.bias": (dim,)})
        shapes.update({f"blocks.{i}.{key}": shape for key, shape in block.items()})
    state = {key: torch.randn(shape, generator=generator) * 0.1 for key, shape in shapes.items()}
    for key in state:
        if key.endswith(("norm1.weight", "norm2.weight", "norm.weight", "gamma")):
            state[key] = 1 + state[key]
    return state


def to_transformers(state: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    out = {"embeddings.cls_token": state["cls_token"], "embeddings.mask_token": state["mask_token"],
           "embeddings.position_embeddings": state["pos_embed"],
           "embeddings.patch_embeddings.projection.weight": state["patch_embed.proj.weight"],
           "embeddings.patch_embeddings.projection.bias": state["patch_embed.proj.bias"],
           "layernorm.weight": state["norm.weight"], "layernorm.bias": state["norm.bias"]}
    for i in range(depth):
        src, dst = f"blocks.{i}.", f"encoder.layer.{i}."
        for name in ("weight", "bias"):
            for norm in ("norm1", "norm2"):
                out[dst + f"{norm}.{name}"] = state[src + f"{norm}.{name}"]
            q, k, v = state[src + f"attn.qkv.{name}"].chunk(3)
            out.update({dst + f"attention.q_proj.{name}": q, dst + f"attention.k_proj.{name}": k,
                        dst + f"attention.v_proj.{name}": v})
            out[dst + f"attention.o_proj.{name}"] = state[src + f"attn.proj.{name}"]
            if src + "mlp.w12.weight" in state:
                gate, up = state[src + f"mlp.w12.{name}"].chunk(2)
                out[dst + f"mlp.gate_proj.{name}"], out[dst + f"mlp.up_proj.{name}"] = gate, up
                out[dst + f"mlp.down_proj.{name}"] = state[src + f"mlp.w3.{name}"]
            else:
                out[dst + f"mlp.fc1.{name}"] = state[src + f"mlp.fc1.{name}"]
                out[dst + f"mlp.fc2.{name}"] = state[src + f"mlp.fc2.{name}"]
        out[dst + "layer_scale1.lambda1"] = state[src + "ls1.gamma"]
        out[dst + "layer_scale2.lambda1"] = state[src + "ls2.gamma"]
    return out


def official_position_embedding(pos_embed: torch.Tensor, rows: int) -> torch.Tensor:
    """DINOv2's interpolate_pos_encoding for a square grid: bicubic with scale factor (rows + 0.1) / stored grid."""
    grid = int((pos_embed.shape[1] - 1) ** 0.5)
    patches = pos_embed[:, 1:].reshape(1, grid, grid, -1).permute(0, 3, 1, 2)
    scale = (rows + 0.1) / grid
    patches = F.interpolate(patches, scale_factor=(scale, scale), mode="bicubic", antialias=False)
    return torch.cat([pos_embed[:, :1], patches.permute(0, 2, 3, 1).reshape(1, rows * rows, -1)], dim=1)


@pytest.mark.parametrize("swiglu", [False, True], ids=["mlp", "swiglu"])
def test_dinov2_backend_matches_transformers(tmp_path, swiglu):
    from transformers import Dinov2Config, Dinov2Model

    from ldm.metrics.dinov2 import IMAGENET_MEAN, IMAGENET_STD, DinoV2Features

    dim, depth, grid = 128, 2, 4  # two 64-wide heads, 56x56 native
    state = official_dinov2_state(dim, depth, grid, swiglu)
    torch.save(state, tmp_path / "dinov2_vitt14_pretrain.pth")
    backend = DinoV2Features(tmp_path / "dinov2_vitt14_pretrain.pth", image_size=56)
    config = dict(hidden_size=dim, num_hidden_layers=depth, num_attention_heads=dim // 64, patch_size=14,
                  mlp_ratio=4, use_swiglu_ffn=swiglu, layer_norm_eps=1e-6, hidden_act="gelu")
    reference = Dinov2Model(Dinov2Config(image_size=56, **config)).eval()
    reference.load_state_dict(to_transformers(state, depth))
    images = torch.rand(3, 3, 56, 56, generator=torch.Generator().manual_seed(1))
    normalized = (images - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)
    with torch.no_grad():
        expected = reference(pixel_values=normalized).pooler_output
        assert backend.feature_dim == dim
        assert torch.allclose(backend(images), expected, atol=1e-4, rtol=1e-4)
        # at 224 pixels (16x16 patches) the stored 4x4 positions are resampled as DINOv2 does
        big = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(2))
        at_224 = to_transformers(state, depth) | {
            "embeddings.position_embeddings": official_position_embedding(state["pos_embed"], 16)}
        reference = Dinov2Model(Dinov2Config(image_size=224, **config)).eval()
        reference.load_state_dict(at_224)
        big_normalized = (big - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)
        assert torch.allclose(backend.network(big_normalized), reference(pixel_values=big_normalized).pooler_output,
                              atol=1e-4, rtol=1e-4)


def tiny_clip_config() -> dict:
    return {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8,
                                            "head_width": 32},
            "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}


def test_clip_backend_and_clip_score_match_open_clip(tmp_path):
    import open_clip
    from PIL import Image

    from ldm.metrics.clip import ClipFeatures

    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32", **tiny_clip_config()).eval()
    torch.save(model.state_dict(), tmp_path / "tiny_clip.pt")
    backend = ClipFeatures(tmp_path / "tiny_clip.pt", "ViT-B-32", **tiny_clip_config())
    images = random_images(3)
    uint8 = ((images + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    # open_clip's own evaluation transform, on the PIL images a user would give it
    transform = open_clip.image_transform(32, is_train=False)
    with torch.no_grad():
        expected = model.encode_image(torch.stack([transform(Image.fromarray(a)) for a in uint8]), normalize=True)
        assert torch.allclose(backend(torch.from_numpy(uint8).permute(0, 3, 1, 2) / 255), expected, atol=1e-5)
        captions = ["a red circle", "a blue square at the top left", "a green triangle"]
        text = model.encode_text(open_clip.get_tokenizer("ViT-B-32", context_length=16)(captions), normalize=True)
    suite = MetricSuite(backend, ["clip_score"])
    suite.update(images, real=True)
    suite.update(torch.from_numpy(uint8), real=False, captions=captions)
    suite.update(images, real=False, captions=captions)  # the same images as floats
    expected_score = float((100 * (expected * text).sum(-1).clamp(min=0)).mean())
    assert suite.compute()["clip_score"] == pytest.approx(expected_score, rel=1e-5)
