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
from open_clip.factory import load_state_dict
from open_clip.model import _build_text_tower
from open_clip.pretrained import download_pretrained, get_pretrained_cfg, list_pretrained_tags_by_model

from ldm.conditioners.embedder import Embedder

_OVERRIDE_HINT = "conditioner.embedders.0.pretrained=/path/to/open_clip_model.safetensors"
_TRUE = {"1", "ON", "YES", "TRUE"}


class WeightsUnavailableError(RuntimeError):
    """Raised when hub weights are asked for but neither cached nor reachable."""


class ClipTextEmbedder(Embedder):
    """The text tower of an open_clip model; fills `tokens` (+ `token_mask`) and/or `vector`.

    `tokens` are the final-layer-normed token states (B, context_length, text width) with a mask that
    is True up to and including the end-of-text token; `vector` is open_clip's `encode_text`
    (B, embed_dim). `pretrained` is an open_clip tag, a local weights file, or None (random init).
    `text_cfg` / `embed_dim` override the named model's config (a tiny tower for tests).
    """

    fields_supported = ("tokens", "vector")

    def __init__(self, model_name: str = "ViT-B-32", pretrained: str | None = None,
                 fields: str | list[str] = ("tokens", "vector"), input_key: str = "caption",
                 trainable: bool = False, drop_rate: float = 0.1, text_cfg: dict | None = None,
                 embed_dim: int | None = None, quick_gelu: bool | None = None, cache_dir: str | None = None):
        fields = fields if isinstance(fields, str) else list(fields)
        super().__init__(input_key, fields, trainable, drop_rate)
        model_cfg = _model_config(model_name)
        weights, tag_cfg = resolve_weights(model_name, pretrained, cache_dir)
        cfg = {**model_cfg["text_cfg"], **dict(text_cfg or {}), "output_tokens": True}
        if quick_gelu is None:
            # a hub tag knows the activation its weights were trained with (OpenAI's need QuickGELU)
            quick_gelu = bool(tag_cfg.get("quick_gelu", model_cfg.get("quick_gelu", False)))
        self.model_name = model_name
        self.text = _build_text_tower(embed_dim or model_cfg["embed_dim"], cfg, quick_gelu=quick_gelu)
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
    def token_dim(self) -> int:
        return self.text.width

    @property
    def vector_dim(self) -> int:
        return self.text.output_dim

    @property
    def context_length(self) -> int:
        return self.text.context_length

    def tokenize(self, captions) -> torch.Tensor:
        """Token ids (B, context_length) on the tower's device."""
        texts = [captions] if isinstance(captions, str) else list(captions)
        bad = [type(t).__name__ for t in texts if not isinstance(t, str)]
        if bad:
            raise TypeError(f"{type(self).__name__} expects caption strings in batch['{self.input_key}'], "
                            f"got {bad[0]}")
        return self.tokenizer(texts).to(self.text.positional_embedding.device)

    def token_mask(self, ids: torch.Tensor) -> torch.Tensor:
        """True up to and including the end-of-text token; the tokenizer puts it last when truncating."""
        eot = (ids == self.tokenizer.eot_token_id).int().argmax(dim=-1)
        return torch.arange(ids.shape[1], device=ids.device)[None] <= eot[:, None]

    def forward(self, captions) -> dict[str, torch.Tensor]:
        ids = self.tokenize(captions)
        with torch.set_grad_enabled(self.trainable and torch.is_grad_enabled()):
            vector, tokens = self.text(ids)
        out = {}
        if "tokens" in self.fields:
            out["tokens"] = tokens
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

    def _load(self, path: str) -> None:
        state = _text_state_dict(load_state_dict(path, device="cpu"))
        positions = state.get("positional_embedding")
        causal = self.text.attn_mask is not None
        if causal and positions is not None and positions.shape[0] > self.context_length:
            # with a causal mask the first positions never see later ones, so a prefix is exact
            state["positional_embedding"] = positions[: self.context_length]
        try:
            self.text.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise ValueError(f"{path} does not hold an open_clip text tower of {self.model_name} with this "
                             f"text_cfg / embed_dim (was it saved from another model?): {err}") from err


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


def _text_state_dict(state: dict) -> dict:
    """The text tower's weights from a full CLIP, a custom-text CLIP, or a text-only state dict."""
    if any(k.startswith("text.") for k in state):
        # CustomTextCLIP, and this embedder's own state dict, keep the tower under `text.`
        state = {k[len("text."):]: v for k, v in state.items() if k.startswith("text.")}
    else:
        state = {k: v for k, v in state.items() if not k.startswith(("visual.", "logit_"))}
    state.pop("attn_mask", None)
    return state


def resolve_weights(model_name: str, pretrained: str | None, cache_dir: str | None = None
                    ) -> tuple[str | None, dict]:
    """Local path of the weights (or None) and the open_clip tag config when `pretrained` is a tag."""
    if pretrained is None:
        return None, {}
    path = Path(pretrained).expanduser()
    if path.is_file():
        return str(path), {}
    tag_cfg = get_pretrained_cfg(model_name, pretrained)
    if not tag_cfg:
        if path.suffix or os.sep in str(pretrained):
            raise FileNotFoundError(f"pretrained weights file not found: {pretrained}")
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
        from huggingface_hub import hf_hub_download

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


__all__ = ["ClipTextEmbedder", "WeightsUnavailableError", "resolve_weights", "reachable"]
