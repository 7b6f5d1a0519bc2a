"""The open_clip text embedder: local weights, offline errors, the empty-prompt null, the configs."""

from __future__ import annotations

import open_clip
import pytest
import torch
from conftest import CONF
from hydra.utils import instantiate
from omegaconf import OmegaConf
from safetensors.torch import save_file

import ldm.conditioners.clip_text as clip_text
from ldm.conditioners import Conditioner
from ldm.conditioners.clip_text import ClipTextEmbedder, WeightsUnavailableError

TINY_TEXT = {"width": 64, "layers": 2, "heads": 4, "context_length": 32, "vocab_size": 49408}
CAPTIONS = ["a small red circle at the top left", "top right: a blue square, large", ""]


def tiny_embedder(**kwargs) -> ClipTextEmbedder:
    return ClipTextEmbedder(model_name="ViT-B-32", text_cfg=TINY_TEXT, embed_dim=32, **kwargs)


@pytest.fixture(scope="module")
def tiny_clip() -> open_clip.CLIP:
    """A whole (tiny) open_clip CLIP, vision tower included, as a checkpoint file would hold."""
    torch.manual_seed(0)
    vision = open_clip.CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=8, image_size=16)
    return open_clip.CLIP(embed_dim=32, vision_cfg=vision, text_cfg=open_clip.CLIPTextCfg(**TINY_TEXT)).eval()


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_weights_file_gives_the_in_memory_features(tiny_clip, tmp_path, suffix):
    path = tmp_path / f"open_clip_model{suffix}"
    state = {k: v.contiguous() for k, v in tiny_clip.state_dict().items()}
    save_file(state, path) if suffix == ".safetensors" else torch.save(state, path)
    embedder = tiny_embedder(pretrained=str(path))
    assert not embedder.training and not any(p.requires_grad for p in embedder.parameters())

    out = embedder(CAPTIONS)
    ids = open_clip.get_tokenizer("ViT-B-32", context_length=32)(CAPTIONS)
    with torch.no_grad():
        vector = tiny_clip.encode_text(ids)
        x = tiny_clip.token_embedding(ids) + tiny_clip.positional_embedding
        tokens = tiny_clip.ln_final(tiny_clip.transformer(x, attn_mask=tiny_clip.attn_mask))
    torch.testing.assert_close(out["vector"], vector)
    torch.testing.assert_close(out["tokens"], tokens)
    assert out["tokens"].shape == (3, 32, 64) and out["vector"].shape == (3, 32)
    # start token + 8 word and punctuation tokens + end token; "" is start and end only
    lengths = [10, 10, 2]
    assert out["token_mask"].sum(1).tolist() == lengths
    for row, length in zip(out["token_mask"], lengths, strict=True):
        assert row[:length].all() and not row[length:].any()
    assert (ids.gather(1, torch.tensor(lengths)[:, None] - 1) == 49407).all()  # the mask ends on EOT


def test_shorter_context_keeps_the_prefix_features(tiny_clip, tmp_path):
    path = tmp_path / "open_clip_model.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_clip.state_dict().items()}, path)
    full = tiny_embedder(pretrained=str(path))(CAPTIONS)
    short = ClipTextEmbedder(model_name="ViT-B-32", text_cfg={**TINY_TEXT, "context_length": 12},
                             embed_dim=32, pretrained=str(path))(CAPTIONS)
    # the causal mask makes the first positions independent of the later ones
    torch.testing.assert_close(short["tokens"], full["tokens"][:, :12])
    torch.testing.assert_close(short["vector"], full["vector"])
    torch.testing.assert_close(short["token_mask"], full["token_mask"][:, :12])


def test_embedder_state_dict_round_trips(tmp_path):
    source = tiny_embedder(pretrained=None)
    path = tmp_path / "text_only.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, path)
    loaded = tiny_embedder(pretrained=str(path))
    torch.testing.assert_close(loaded(CAPTIONS)["tokens"], source(CAPTIONS)["tokens"])


def test_wrong_weights_file_is_named(tiny_clip, tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_clip.state_dict().items()}, path)
    with pytest.raises(ValueError, match="other.safetensors"):
        ClipTextEmbedder(model_name="ViT-B-32", pretrained=str(path))  # the full-size tower
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        tiny_embedder(pretrained=str(tmp_path / "missing.safetensors"))


def _no_download(*args, **kwargs):
    raise AssertionError("tried to download while offline")


def test_hub_tag_offline_env_fails_with_the_local_file_hint(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(clip_text, "download_pretrained", _no_download)
    with pytest.raises(WeightsUnavailableError, match=r"conditioner\.embedders\.0\.pretrained=/path/to/"):
        ClipTextEmbedder(model_name="ViT-B-32", pretrained="laion2b_s34b_b79k", cache_dir=str(tmp_path))


def test_hub_tag_unreachable_fails_without_retrying(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    if clip_text.reachable("https://huggingface.co"):
        pytest.skip("the hub is reachable from this machine")
    monkeypatch.setattr(clip_text, "download_pretrained", _no_download)
    with pytest.raises(WeightsUnavailableError, match="cannot be reached"):
        ClipTextEmbedder(model_name="ViT-B-32", pretrained="laion2b_s34b_b79k", cache_dir=str(tmp_path))
    assert not clip_text.reachable("https://hub.invalid")


def test_unknown_tag_lists_the_tags():
    with pytest.raises(ValueError, match="laion2b_s34b_b79k"):
        tiny_embedder(pretrained="no_such_tag")


@pytest.mark.parametrize("trainable", [False, True])
def test_dropped_captions_are_the_empty_prompt(trainable):
    torch.manual_seed(0)
    embedder = tiny_embedder(pretrained=None, trainable=trainable, drop_rate=1.0)
    conditioner = Conditioner([embedder], vector_dim=32, context_dim=64).train()
    assert embedder.training == trainable
    batch = {"caption": CAPTIONS[:2]}
    dropped = conditioner(batch)
    forced = conditioner.eval()(batch, force_drop=True)
    empty = embedder([""] * 2)
    for cond in (dropped, forced):
        torch.testing.assert_close(cond.vector, empty["vector"])
        torch.testing.assert_close(cond.tokens, empty["tokens"])
        assert cond.token_mask.sum(1).tolist() == [2, 2]
    kept = conditioner(batch)
    assert kept.token_mask.sum(1).tolist() == [10, 10]
    assert not torch.allclose(kept.vector, empty["vector"])
    # a trainable tower's null keeps its graph so the empty prompt trains too
    assert embedder.null(2, "cpu")["vector"].requires_grad == trainable


def test_frozen_null_is_memoized_and_reset_on_load():
    embedder = tiny_embedder(pretrained=None)
    first = embedder.null(3, "cpu")["vector"]
    assert first.shape == (3, 32) and embedder.null(1, "cpu")["vector"].data_ptr() == first.data_ptr()
    state = {k: torch.randn_like(v) for k, v in embedder.state_dict().items()}
    embedder.load_state_dict(state)
    assert not torch.allclose(embedder.null(1, "cpu")["vector"], first[:1])


def test_single_field_and_trainable_gradients():
    embedder = tiny_embedder(pretrained=None, fields="tokens", trainable=True)
    out = embedder(CAPTIONS)
    assert set(out) == {"tokens", "token_mask"} and embedder.training
    out["tokens"][out["token_mask"]].sum().backward()
    assert embedder.text.token_embedding.weight.grad is not None
    with pytest.raises(TypeError, match="caption strings"):
        embedder([1, 2])


def _compose(conditioner, data: dict):
    """The conditioner node under a minimal `data` node, instantiated as train.py would."""
    if isinstance(conditioner, str):
        conditioner = OmegaConf.load(CONF / "conditioner" / f"{conditioner}.yaml")
    return instantiate(OmegaConf.create({"data": data, "conditioner": conditioner}).conditioner)


def test_tiny_config_composes_and_runs():
    conditioner = _compose("clip_text_tiny", {"num_classes": None}).eval()  # eval: no random drops
    cond = conditioner({"caption": CAPTIONS})
    assert cond.vector.shape == (3, 64) and cond.tokens.shape == (3, 32, 64)
    assert cond.token_mask.sum(1).tolist() == [10, 10, 2]


@pytest.mark.parametrize("name, vector_dim", [("clip_text", 512), ("class_text", 768)])
def test_hub_configs_declare_the_dims_of_their_tower(name, vector_dim):
    cfg = OmegaConf.load(CONF / "conditioner" / f"{name}.yaml")
    text = next(e for e in cfg.embedders if e._target_.endswith("ClipTextEmbedder"))
    assert text.pretrained == "laion2b_s34b_b79k" and not text.trainable
    text.pretrained = None  # the same architecture, randomly initialised: no weights offline
    conditioner = _compose(cfg, {"num_classes": 10}).eval()
    cond = conditioner({"caption": CAPTIONS, "label": torch.tensor([0, 1, 2])})
    assert cond.vector.shape == (3, vector_dim) and cond.tokens.shape == (3, 77, 512)
