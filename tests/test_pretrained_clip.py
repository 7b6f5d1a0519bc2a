"""CLIP text towers from Hugging Face and open_clip files, against transformers' CLIPTextModel with random weights."""

from __future__ import annotations

import json

import open_clip
import pytest
import torch
import transformers
from conftest import CONF
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from ldm.conditioners.clip_text import ClipTextEmbedder, MissingWeightsError
from ldm.weights.clip_text import TextWeightsError
from ldm.weights.files import WeightsError

EOT = 49407
TEXT_CFG = {"width": 64, "layers": 3, "heads": 4, "context_length": 77, "vocab_size": 49408}
CAPTIONS = ["a small red circle at the top left", "top right: a blue square, large", "", "word " * 100]
TOLERANCE = 1e-4  # largest |difference| over the reference's largest |value|, float32


def hf_model(act: str = "quick_gelu", layers: int = 3, projection: bool = False, eos: int = EOT, seed: int = 0):
    """A small transformers CLIP text tower with every weight random (layer norms included)."""
    config = transformers.CLIPTextConfig(
        hidden_size=64, intermediate_size=256, num_hidden_layers=layers, num_attention_heads=4, projection_dim=32,
        max_position_embeddings=77, vocab_size=49408, hidden_act=act, eos_token_id=eos)
    model_type = transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel
    model = model_type(config).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            norm_scale = "layer_norm" in name and name.endswith("weight")
            param.copy_(1 + 0.2 * noise if norm_scale else 0.05 * noise)
    return model


def save(model, root, layout: str):
    """`model` written as a model directory, a pipeline directory, its file, or a transformers 4.x file alone."""
    if layout == "pipeline":
        model.save_pretrained(root / "text_encoder")
        (root / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
        return root
    model.save_pretrained(root / "model")
    if layout == "dir":
        return root / "model"
    if layout == "file":
        return root / "model" / "model.safetensors"
    # transformers 4.x kept the tower under `text_model.` and, before 4.31, saved the position_ids buffer
    state = {f"text_model.{k}" if not k.startswith("text_projection") else k: v
             for k, v in load_file(root / "model" / "model.safetensors").items()}
    state["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    (root / "legacy").mkdir()
    save_file(state, root / "legacy" / "pytorch_model.safetensors")
    return root / "legacy" / "pytorch_model.safetensors"


def embedder(pretrained, **kwargs) -> ClipTextEmbedder:
    options = {"model_name": "ViT-L-14", "text_cfg": TEXT_CFG, "embed_dim": 32, "fields": ["tokens"],
               "pad_token": "eot", "mask_padding": False, **kwargs}
    return ClipTextEmbedder(pretrained=str(pretrained), **options)


def rel_diff(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return ((ours - reference).abs().max() / reference.abs().max()).item()


def assert_matches(ours, reference, what: str) -> None:
    diff = rel_diff(ours, reference)
    print(f"{what}: largest relative difference {diff:.2e}")
    assert ours.shape == reference.shape and diff <= TOLERANCE, f"{what}: {diff:.2e}"


@pytest.mark.parametrize("layout", ["dir", "pipeline", "file", "legacy"])
@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_last_layer_is_last_hidden_state(tmp_path, act, layout):
    model = hf_model(act)
    # the legacy file comes alone, so the activation is the configured one
    quick_gelu = act == "quick_gelu" if layout == "legacy" else None
    ours = embedder(save(model, tmp_path, layout), quick_gelu=quick_gelu)
    out = ours(CAPTIONS)
    assert set(out) == {"tokens"}  # mask_padding=false: the UNet sees every state
    with torch.no_grad():
        reference = model(input_ids=ours.tokenize(CAPTIONS)).last_hidden_state
    assert_matches(out["tokens"], reference, f"tokens vs last_hidden_state ({act}, {layout})")


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_earlier_layers_are_final_normed_hidden_states(tmp_path, act):
    model = hf_model(act)
    path = save(model, tmp_path, "dir")
    ids = embedder(path).tokenize(CAPTIONS)
    with torch.no_grad():
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
        for layer, index in (("penultimate", -2), (-2, -2), (-3, -3)):
            reference = model.final_layer_norm(hidden[index])
            assert_matches(embedder(path, layer=layer)(CAPTIONS)["tokens"], reference, f"layer={layer} ({act})")


@pytest.mark.parametrize("pad_token", ["eot", "zero"])
@pytest.mark.parametrize("eos", [EOT, 2])  # 2: configs written before transformers pooled at the first eos id
def test_vector_is_text_embeds_at_end_of_text(tmp_path, eos, pad_token):
    model = hf_model(projection=True, eos=eos)
    ours = embedder(save(model, tmp_path, "dir"), fields=["tokens", "vector"], pad_token=pad_token,
                    mask_padding=True)
    out = ours(CAPTIONS)
    ids = ours.tokenize(CAPTIONS)
    with torch.no_grad():
        reference = model(input_ids=ids)
    # open_clip pools at argmax(ids), transformers at the first eos: both are the end-of-text token here
    assert ((ids == EOT).int().argmax(-1) == ids.argmax(-1)).all()
    assert_matches(out["vector"], reference.text_embeds, f"vector vs text_embeds (eos {eos}, pad {pad_token})")
    assert_matches(out["tokens"], reference.last_hidden_state, f"tokens (eos {eos}, pad {pad_token})")
    assert out["token_mask"].sum(1).tolist() == [10, 10, 2, 77]


def test_sd2_text_encoder_with_its_last_block_removed(tmp_path):
    """diffusers' SD-2 text encoder keeps the blocks the penultimate layer runs; its last state is that layer."""
    model = hf_model("gelu", layers=2)
    path = save(model, tmp_path, "pipeline")
    ours = embedder(path, layer="penultimate", pad_token="zero")  # a 3-block tower, as ViT-H-14 has 24
    ids = ours.tokenize(CAPTIONS)
    with torch.no_grad():
        reference = model(input_ids=ids).last_hidden_state
    assert_matches(ours(CAPTIONS)["tokens"], reference, "penultimate of 3 vs last of the 2-block file")
    with pytest.raises(TextWeightsError, match="holds 2 residual blocks"):
        embedder(path, layer="last")
    with pytest.raises(TextWeightsError, match="holds 2 of the 3 blocks"):
        embedder(path, layer="penultimate", fields=["tokens", "vector"])


def test_open_clip_files_still_load(tmp_path):
    """An open_clip CLIP's own state dict; the penultimate layer as LDM's FrozenOpenCLIPEmbedder computes it."""
    torch.manual_seed(0)
    vision = open_clip.CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=8, image_size=16)
    clip = open_clip.CLIP(embed_dim=32, vision_cfg=vision, text_cfg=open_clip.CLIPTextCfg(**TEXT_CFG)).eval()
    path = tmp_path / "open_clip_model.safetensors"
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, path)
    ours = embedder(path, layer="penultimate", fields=["tokens", "vector"], pad_token="zero", quick_gelu=False)
    ids = ours.tokenize(CAPTIONS)
    with torch.no_grad():
        x = clip.token_embedding(ids) + clip.positional_embedding
        for block in clip.transformer.resblocks[:-1]:
            x = block(x, attn_mask=clip.attn_mask)
        out = ours(CAPTIONS)
        assert_matches(out["tokens"], clip.ln_final(x), "open_clip file, penultimate")
        assert_matches(out["vector"], clip.encode_text(ids), "open_clip file, vector")
    # a Hugging Face file read once, saved under open_clip's names, reads back the same
    model = hf_model(projection=True)
    converted = embedder(save(model, tmp_path, "dir"), fields=["tokens", "vector"])
    save_file({k: v.contiguous() for k, v in converted.state_dict().items()}, tmp_path / "converted.safetensors")
    again = embedder(tmp_path / "converted.safetensors", fields=["tokens", "vector"], quick_gelu=True)
    for key, value in converted(CAPTIONS).items():
        torch.testing.assert_close(again(CAPTIONS)[key], value, rtol=0, atol=0)


def test_mismatches_are_named(tmp_path):
    gelu = save(hf_model("gelu"), tmp_path, "dir")
    with pytest.raises(TextWeightsError, match=r"quick_gelu=True, but .* hidden_act=gelu"):
        embedder(gelu, quick_gelu=True)
    with pytest.raises(TextWeightsError, match="num_attention_heads=4"):
        embedder(gelu, text_cfg={**TEXT_CFG, "heads": 8})
    with pytest.raises(TextWeightsError, match="has no text_projection"):
        embedder(gelu, fields=["tokens", "vector"])
    with pytest.raises(TextWeightsError, match="holds 3 residual blocks"):
        embedder(gelu, text_cfg={**TEXT_CFG, "layers": 2})
    with pytest.raises(ValueError, match="layer=2"):
        embedder(gelu, layer=2)
    with pytest.raises(ValueError, match="pad_token='bos'"):
        embedder(gelu, pad_token="bos")


def preset(name: str, pretrained, layers: int = 3):
    """A conditioner preset with the tiny tower of these tests in place of the full-size one."""
    cfg = OmegaConf.load(CONF / "conditioner" / f"{name}.yaml")
    cfg.context_dim = TEXT_CFG["width"]
    cfg.embedders[0].text_cfg = {**TEXT_CFG, "layers": layers}
    cfg.embedders[0].embed_dim = 32
    cfg.embedders[0].pretrained = None if pretrained is None else str(pretrained)
    try:
        return instantiate(cfg).eval()
    except InstantiationException as err:
        raise err.__cause__ from None  # the embedder's own error


def sd1_tokenizer(tmp_path, embedder_: ClipTextEmbedder):
    """transformers' CLIPTokenizer on open_clip's vocabulary, padding as SD-1.5's tokenizer_config says."""
    bpe = embedder_.tokenizer
    names = {bpe.sot_token_id: "<|startoftext|>", bpe.eot_token_id: "<|endoftext|>"}
    (tmp_path / "vocab.json").write_text(json.dumps({names.get(i, s): i for s, i in bpe.encoder.items()}))
    merges = sorted(bpe.bpe_ranks, key=bpe.bpe_ranks.get)
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return transformers.CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"),
                                      pad_token="<|endoftext|>", model_max_length=77)


def test_sd15_preset_gives_what_the_sd1_pipeline_gives(tmp_path):
    model = hf_model("quick_gelu")
    conditioner = preset("sd15_text", save(model, tmp_path, "pipeline"))
    [text] = conditioner.embedders
    ids = text.tokenize(CAPTIONS)
    hf_ids = sd1_tokenizer(tmp_path, text)(CAPTIONS, padding="max_length", max_length=77, truncation=True,
                                            return_tensors="pt").input_ids
    torch.testing.assert_close(ids, hf_ids, rtol=0, atol=0)
    assert (ids[2, 1:] == EOT).all() and (ids[0, 9:] == EOT).all()  # "" and a 9-token caption: EOT to the end
    cond = conditioner({"caption": CAPTIONS})
    assert cond.token_mask is None and cond.vector is None
    with torch.no_grad():
        reference = model(input_ids=hf_ids).last_hidden_state
    assert_matches(cond.tokens, reference, "sd15_text preset vs SD-1 pipeline")


def test_sd2_preset_gives_what_the_sd2_pipeline_gives(tmp_path):
    model = hf_model("gelu", layers=2)
    conditioner = preset("sd2_text", save(model, tmp_path, "pipeline"))
    ids = conditioner.embedders[0].tokenize(CAPTIONS)
    torch.testing.assert_close(ids, open_clip.tokenize(CAPTIONS), rtol=0, atol=0)  # LDM's FrozenOpenCLIPEmbedder
    assert (ids[2, 2:] == 0).all()
    cond = conditioner({"caption": CAPTIONS})
    assert cond.token_mask is None
    with torch.no_grad():
        reference = model(input_ids=ids).last_hidden_state
    assert_matches(cond.tokens, reference, "sd2_text preset vs SD-2 pipeline")
    with pytest.raises(TextWeightsError, match="hidden_act=quick_gelu"):
        preset("sd2_text", save(hf_model("quick_gelu", layers=2), tmp_path / "other", "dir"))


def test_missing_weights_name_the_file_to_give(tmp_path):
    with pytest.raises(MissingWeightsError, match=r"conditioner\.embedders\.0\.pretrained=/path/to/sd15/text_encoder"):
        preset("sd15_text", None)
    with pytest.raises(MissingWeightsError, match=r"conditioner\.embedders\.0\.pretrained=/path/to/sd2/text_encoder"):
        preset("sd2_text", None)
    with pytest.raises(MissingWeightsError, match="nowhere/text_encoder does not exist"):
        embedder(tmp_path / "nowhere" / "text_encoder")
    (tmp_path / "pipeline").mkdir()
    with pytest.raises(WeightsError, match=r"pipeline/text_encoder"):
        embedder(tmp_path / "pipeline")
