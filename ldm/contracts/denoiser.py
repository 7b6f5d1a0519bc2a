"""Checks that a conditioner and a denoiser agree on which `Conditioning` fields flow between them."""

from __future__ import annotations

from collections.abc import Iterable

from ldm.contracts.conditioning import FIELDS

# what to set on the model so that it consumes a field
_HINTS = {
    "vector": "set model.vector_dim to use a vector (class or pooled text embedding)",
    "tokens": "set model.context_dim to use text tokens",
    "token_mask": "set model.context_dim to use text tokens",
    "concat": "set model.concat_channels to join an image to the input",
}


def consumed_fields(vector_dim: int | None, context_dim: int | None, concat_channels: int) -> frozenset[str]:
    """The fields a denoiser built with these arguments reads."""
    fields = set()
    if vector_dim:
        fields.add("vector")
    if context_dim:
        fields |= {"tokens", "token_mask"}
    if concat_channels > 0:
        fields.add("concat")
    return frozenset(fields)


def check_conditioning(denoiser, provides: Iterable[str]) -> None:
    """Raise a ValueError when `provides` (the conditioner's fields) and `denoiser.consumes` disagree.

    A provided field the denoiser ignores would silently drop the condition; a consumed field that
    is not provided would fail at the first step. `token_mask` is optional beside `tokens`.
    """
    provides = frozenset(provides)
    unknown = provides - set(FIELDS)
    if unknown:
        raise ValueError(f"unknown Conditioning fields {sorted(unknown)}; the fields are {FIELDS}")
    consumes = frozenset(denoiser.consumes)
    if "tokens" in consumes:
        consumes |= {"token_mask"}
    name = type(denoiser).__name__
    it_consumes = ", ".join(f for f in FIELDS if f in consumes) or "nothing"

    ignored = [f for f in FIELDS if f in provides - consumes]
    if "tokens" in ignored and "token_mask" in ignored:
        ignored.remove("token_mask")  # one condition, reported once
    if ignored:
        fields = ", ".join(f"Conditioning.{f}" for f in ignored)
        hints = "; ".join(dict.fromkeys(_HINTS[f] for f in ignored))
        raise ValueError(f"model={name} does not consume {fields} (it consumes: {it_consumes}); "
                         f"{hints}, or pick another conditioner")

    missing = [f for f in FIELDS if f in consumes - provides and f != "token_mask"]
    if missing:
        fields = ", ".join(f"Conditioning.{f}" for f in missing)
        given = ", ".join(f for f in FIELDS if f in provides) or "nothing"
        raise ValueError(f"model={name} needs {fields} but the conditioner provides: {given}; "
                         f"pick a conditioner that provides it, or build the model without it")
