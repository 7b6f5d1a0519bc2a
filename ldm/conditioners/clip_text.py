"""Captions to open_clip text features: per-token states and the pooled, projected embedding."""

from __future__ import annotations

import os
import socket
import threading
import urllib.request
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlsplit

import open_clip
import torch
from open_clip.model import _build_text_tower
from open_clip.pretrained import download_pretrained, get_pretrained_cfg, list_pretrained_tags_by_model

from ldm.conditioners.embedder import Embedder
from ldm.utils.errors import ConfigError
from ldm.weights.clip_text import TextWeights, TextWeightsError, check_hf_config, quick_gelu_of, read_text_weights
from ldm.weights.files import WeightsError, load_mapped

_OVERRIDE_HINT = "conditioner.embedders.0.pretrained=/path/to/open_clip_model.safetensors"
_TRUE = {"1", "ON", "YES", "TRUE"}
_LAYERS = {"last": -1, "penultimate": -2}
PAD_TOKENS = ("zero", "eot")


class WeightsUnavailableError(RuntimeError):
    """Raised when hub weights are asked for but neither cached nor reachable."""


class MissingWeightsError(WeightsError, FileNotFoundError):
    """The weights a text tower needs were not given, or their path does not exist."""


class ClipTextEmbedder(Embedder):
    """The text tower of an open_clip model; fills `tokens` (+ `token_mask`) and/or `vector`.

    `tokens` are the states of `layer` after the final layer norm (B, context_length, text width), with
    a mask that is True up to and including the end-of-text token unless `mask_padding` is false;
    `vector` is open_clip's `encode_text` (B, embed_dim). `pretrained` is an open_clip tag, a local
    open_clip file, a Hugging Face `CLIPTextModel` file or directory, a diffusers pipeline directory
    (its `text_encoder/`), or None (random init). `text_cfg` / `embed_dim` override the named
    model's config (a tiny tower for tests). `pad_token` fills the ids after end-of-text: `zero`
    (open_clip, SD-2) or `eot` (SD-1's tokenizer). `required_weights` makes pretrained=None an error
    that names the weights to give.
    """

    fields_supported = ("tokens", "vector")

    def __init__(self, model_name: str = "ViT-B-32", pretrained: str | None = None,
                 fields: str | list[str] = ("tokens", "vector"), input_key: str = "caption",
                 trainable: bool = False, drop_rate: float = 0.1, text_cfg: dict | None = None,
                 embed_dim: int | None = None, quick_gelu: bool | None = None, cache_dir: str | None = None,
                 layer: str | int = "last", pad_token: str = "zero", mask_padding: bool = True,
                 required_weights: str | None = None):
        fields = fields if isinstance(fields, str) else list(fields)
        super().__init__(input_key, fields, trainable, drop_rate)
        if pad_token not in PAD_TOKENS:
            raise ConfigError([f"pad_token={pad_token!r}: use zero (open_clip, SD-2) or eot (SD-1's tokenizer)"])
        model_cfg = _model_config(model_name)
        path, tag_cfg = resolve_weights(model_name, pretrained, cache_dir)
        if path is None and required_weights:
            raise MissingWeightsError(f"pretrained is null but this {model_name} text tower needs {required_weights}")
        weights = read_text_weights(path) if path is not None else None
        cfg = {**model_cfg["text_cfg"], **dict(text_cfg or {}), "output_tokens": True}
        self.blocks_skipped = blocks_skipped(layer, cfg["layers"])
        self.vector_unavailable: str | None = None
        if weights is not None:
            cfg = self._fit_to_file(cfg, weights)
        self.model_name = model_name
        self.pad_token = pad_token
        self.mask_padding = mask_padding
        self.text = _build_text_tower(embed_dim or model_cfg["embed_dim"], cfg,
                                      quick_gelu=_quick_gelu(quick_gelu, weights, tag_cfg, model_cfg))
        self.tokenizer = _tokenizer(model_name, self.text.context_length)
        if self.tokenizer.vocab_size > self.text.vocab_size:
            raise ValueError(f"text_cfg.vocab_size={self.text.vocab_size} is smaller than the tokenizer's "
                             f"{self.tokenizer.vocab_size} tokens")
        if weights is not None:
            self._load(weights)
        self._null_memo: tuple | None = None
        # weights restored from a checkpoint may differ from those the memo was computed with
        self.register_load_state_dict_post_hook(lambda module, keys: setattr(module, "_null_memo", None))
        self.freeze_if_needed()

    @property
    def outputs(self) -> tuple[str, ...]:
        mask = ("token_mask",) if "tokens" in self.fields and self.mask_padding else ()
        return self.fields + mask

    @property
    def token_dim(self) -> int:
        return self.text.width

    @property
    def vector_dim(self) -> int | None:
        return None if self.vector_unavailable else self.text.output_dim

    @property
    def context_length(self) -> int:
        return self.text.context_length

    def tokenize(self, captions) -> torch.Tensor:
        """Token ids (B, context_length) on the tower's device, padded with `pad_token` after end-of-text."""
        texts = [captions] if isinstance(captions, str) else list(captions)
        bad = [type(t).__name__ for t in texts if not isinstance(t, str)]
        if bad:
            raise TypeError(f"{type(self).__name__} expects caption strings in batch['{self.input_key}'], "
                            f"got {bad[0]}")
        ids = self.tokenizer(texts)
        if self.pad_token == "eot":
            # SD-1's Hugging Face tokenizer pads with end-of-text, and its UNet saw those states
            ids = ids.masked_fill(~self.token_mask(ids), self.tokenizer.eot_token_id)
        return ids.to(self.text.positional_embedding.device)

    def token_mask(self, ids: torch.Tensor) -> torch.Tensor:
        """True up to and including the (first) end-of-text token; the tokenizer puts it last when truncating."""
        eot = (ids == self.tokenizer.eot_token_id).int().argmax(dim=-1)
        return torch.arange(ids.shape[1], device=ids.device)[None] <= eot[:, None]

    def encode(self, ids: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(vector or None when not asked for, tokens): the states after `layer` blocks, final-layer-normed."""
        wants_vector = "vector" in self.fields
        last = len(self.text.transformer.resblocks) - 1
        out = self.text.forward_intermediates(ids, indices=[last - self.blocks_skipped], stop_early=not wants_vector,
                                              normalize_intermediates=True, intermediates_only=not wants_vector,
                                              output_fmt="NLC")
        return out.get("text_features"), out["text_intermediates"][0]

    def forward(self, captions) -> dict[str, torch.Tensor]:
        ids = self.tokenize(captions)
        with torch.set_grad_enabled(self.trainable and torch.is_grad_enabled()):
            vector, tokens = self.encode(ids)
        out = {}
        if "tokens" in self.fields:
            out["tokens"] = tokens
            if self.mask_padding:
                out["token_mask"] = self.token_mask(ids)
        if "vector" in self.fields:
            out["vector"] = vector
        return out

    def null(self, batch_size: int, device) -> dict[str, torch.Tensor]:
        """The empty prompt's features, as Stable Diffusion drops captions."""
        if self.trainable:
            empty = self([""])
        else:
            key = (torch.device(device), self.text.positional_embedding.dtype)
            if self._null_memo is None or self._null_memo[0] != key:
                self._null_memo = (key, {k: v.to(device) for k, v in self([""]).items()})
            empty = self._null_memo[1]
        return {k: v.to(device).expand(batch_size, *v.shape[1:]) for k, v in empty.items()}

    def _fit_to_file(self, cfg: dict, weights: TextWeights) -> dict:
        """The tower config that runs `weights`: a file may hold fewer blocks than the tower, or no projection."""
        layers, held = cfg["layers"], weights.layers
        if held != layers:
            depth = layers - self.blocks_skipped
            if not depth <= held < layers:
                raise TextWeightsError(
                    f"{weights.source} holds {held} residual blocks, the text tower (text_cfg.layers={layers}) has "
                    f"{layers} and its layer runs {depth}: give the weights of this tower, or set text_cfg.layers")
            # diffusers' SD-2 text encoder keeps only the 23 of OpenCLIP ViT-H's 24 blocks that SD-2 runs
            cfg = {**cfg, "layers": held}
            self.blocks_skipped = held - depth
            self.vector_unavailable = f"{weights.source} holds {held} of the {layers} blocks the pooled vector needs"
        if not weights.has_projection:
            cfg = {**cfg, "proj_type": "none"}
            self.vector_unavailable = self.vector_unavailable or (
                f"{weights.source} has no text_projection (a CLIPTextModel; a CLIPTextModelWithProjection has one)")
        if self.vector_unavailable and "vector" in self.fields:
            raise TextWeightsError(f"fields includes vector, but {self.vector_unavailable}: use fields: [tokens], or "
                                   f"give weights with the whole tower and its projection")
        if weights.hf_config is not None:
            check_hf_config(weights, cfg["width"], cfg["heads"])
        return cfg

    def _load(self, weights: TextWeights) -> None:
        state = dict(weights.state)
        positions = state.get("positional_embedding")
        causal = self.text.attn_mask is not None
        if causal and positions is not None and positions.shape[0] > self.context_length:
            # with a causal mask the first positions never see later ones, so a prefix is exact
            state["positional_embedding"] = positions[: self.context_length]
        try:
            load_mapped(self.text, state, weights.source)
        except WeightsError as err:
            raise TextWeightsError([f"{weights.source} does not hold a text tower of {self.model_name} with this "
                                    f"text_cfg / embed_dim (was it saved from another model?)", *err.problems]) from err


def blocks_skipped(layer: str | int, layers: int) -> int:
    """How many final residual blocks `layer` leaves out: last -> 0, penultimate -> 1, -k -> k - 1."""
    index = _LAYERS.get(layer, layer) if isinstance(layer, str) else layer
    if isinstance(index, bool) or not isinstance(index, int) or not -layers <= index <= -1:
        raise ConfigError([f"layer={layer!r}: use last, penultimate, or -k for the k-th of the {layers} blocks "
                           f"from the end (-1 = last, -2 = penultimate)"])
    return -index - 1


def _quick_gelu(configured: bool | None, weights: TextWeights | None, tag_cfg: dict, model_cfg: dict) -> bool:
    """The activation of the weights: their config.json's, else the configured one, else the tag's or model's."""
    from_file = quick_gelu_of(weights) if weights is not None else None
    if from_file is not None and configured is not None and configured != from_file:
        act = "quick_gelu" if from_file else "gelu"
        raise TextWeightsError(f"quick_gelu={configured}, but {weights.source} was trained with hidden_act={act} "
                               f"(its config.json): set quick_gelu: {from_file}, or null to follow the file "
                               f"(OpenAI's CLIP, SD-1's text encoder, uses quick_gelu; OpenCLIP ViT-H, SD-2's, gelu)")
    if from_file is not None:
        return from_file
    if configured is None:
        # a hub tag knows the activation its weights were trained with (OpenAI's need QuickGELU)
        return bool(tag_cfg.get("quick_gelu", model_cfg.get("quick_gelu", False)))
    return configured


@lru_cache(maxsize=8)
def _tokenizer(model_name: str, context_length: int):
    # parsing the bundled BPE vocabulary takes about a second; embedders can share one tokenizer
    return open_clip.get_tokenizer(model_name, context_length=context_length)


def _model_config(model_name: str) -> dict:
    if ":" in model_name:
        raise ValueError(f"model_name={model_name}: use a built-in open_clip architecture name (e.g. "
                         f"ViT-B-32) and give the weights as pretrained=FILE or an open_clip tag")
    cfg = open_clip.get_model_config(model_name)
    if cfg is None:
        raise ValueError(f"open_clip has no model named {model_name}; see open_clip.list_models()")
    text_cfg = cfg["text_cfg"]
    if text_cfg.get("hf_model_name") or text_cfg.get("hf_tokenizer_name") or text_cfg.get("embed_cls") \
            or "siglip" in model_name.lower():
        raise ValueError(f"{model_name} uses a Hugging Face text model or tokenizer (or a CoCa class token); "
                         f"ClipTextEmbedder supports open_clip's own text transformer and bundled tokenizer")
    return cfg


def resolve_weights(model_name: str, pretrained: str | None, cache_dir: str | None = None
                    ) -> tuple[str | None, dict]:
    """Local path of the weights (file or directory; None for none) and the tag config when `pretrained` is a tag."""
    if pretrained is None:
        return None, {}
    path = Path(pretrained).expanduser()
    if path.exists():
        return str(path), {}
    tag_cfg = get_pretrained_cfg(model_name, pretrained)
    if not tag_cfg:
        if path.suffix or os.sep in str(pretrained):
            raise MissingWeightsError(f"pretrained weights not found: {pretrained} does not exist; give an open_clip "
                                      f"file, a Hugging Face CLIPTextModel file or directory, or a diffusers directory")
        raise ValueError(f"pretrained={pretrained} is neither a file nor an open_clip tag of {model_name} "
                         f"(tags: {list_pretrained_tags_by_model(model_name)})")
    cached = _cached_file(tag_cfg, cache_dir)
    if cached is not None:
        return cached, tag_cfg
    source = _source_url(tag_cfg)
    if tag_cfg.get("hf_hub") and os.environ.get("HF_HUB_OFFLINE", "").upper() in _TRUE:
        reason = "HF_HUB_OFFLINE is set"
    elif not reachable(source):
        reason = f"{urlsplit(source).hostname} cannot be reached"
    else:
        return download_pretrained(tag_cfg, cache_dir=cache_dir), tag_cfg
    raise WeightsUnavailableError(
        f"open_clip weights {model_name}/{pretrained} are not cached and {reason}. Download {source} "
        f"on a machine with network and pass the local file: {_OVERRIDE_HINT} "
        f"(the index is this text embedder's place in conditioner.embedders)")


def _hub_files(tag_cfg: dict) -> tuple[str, list[str]]:
    repo, filename = os.path.split(tag_cfg["hf_hub"])
    filename = filename or "open_clip_pytorch_model.bin"
    # open_clip prefers a safetensors twin of a pickled checkpoint when the repo has one
    if filename == "open_clip_pytorch_model.bin":
        return repo, ["open_clip_model.safetensors", filename]
    if filename.endswith((".bin", ".pth")):
        return repo, [filename[:-4] + ".safetensors", filename]
    return repo, [filename]


def _cached_file(tag_cfg: dict, cache_dir: str | None) -> str | None:
    if tag_cfg.get("file"):
        return tag_cfg["file"]
    if tag_cfg.get("hf_hub"):
        from huggingface_hub import hf_hub_download  # deferred: the hub client, only for a named download

        repo, filenames = _hub_files(tag_cfg)
        for filename in filenames:
            try:
                return hf_hub_download(repo, filename, cache_dir=cache_dir, local_files_only=True)
            except Exception:  # noqa: BLE001 - any failure here just means "not cached"
                continue
        return None
    url_file = Path(cache_dir or "~/.cache/clip").expanduser() / os.path.basename(tag_cfg.get("url", ""))
    return str(url_file) if url_file.is_file() else None


def _source_url(tag_cfg: dict) -> str:
    if tag_cfg.get("hf_hub"):
        repo, filenames = _hub_files(tag_cfg)
        endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
        return f"{endpoint}/{repo}/resolve/main/{filenames[0]}"
    return tag_cfg["url"]


def reachable(url: str, timeout: float = 3.0) -> bool:
    """A quick TCP connection to `url`'s host (or the https proxy), so an offline machine fails at once."""
    target = urlsplit(urllib.request.getproxies().get("https") or url)
    address = (target.hostname, target.port or (443 if target.scheme == "https" else 80))
    result: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection(address, timeout=timeout):
                result.append(True)
        except OSError:
            pass

    # name resolution ignores the socket timeout, so the thread bounds a hanging resolver too
    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 1.0)
    return bool(result)


__all__ = ["ClipTextEmbedder", "MissingWeightsError", "WeightsUnavailableError", "blocks_skipped", "resolve_weights",
           "reachable"]
