"""Key and layout map between transformers' `UMT5EncoderModel` state dict and our NNX tree.

`encoder.block.7.layer.0.SelfAttention.q.weight` maps to `blocks.attention.q.kernel`, layer 7 of
the stacked leaf, transposed to [in, out]. The token table is stored as `shared.weight`; the
encoder's own `encoder.embed_tokens.weight` is tied to it and usually not stored (spec B.5). When it
is stored, transformers uses it, even where it differs from `shared.weight` (it then unties the
two); `UsedTokenTable` makes a reader show only the table the encoder uses.
"""
from __future__ import annotations

import re

import numpy as np

from checkpoints_convert.key_rules import Target, match_rules

# Layout transforms, torch -> ours. Each has an exact inverse in `to_torch_layout`.
LINEAR, SAME = "linear", "same"

TOKEN_TABLE = "shared.weight"
TOKEN_TABLE_ALIAS = "encoder.embed_tokens.weight"

_TOP = (
    (r"^shared\.weight$", "token_embedding.embedding", SAME),
    (r"^encoder\.embed_tokens\.weight$", "token_embedding.embedding", SAME),
    (r"^encoder\.final_layer_norm\.weight$", "final_norm.scale", SAME),
)
# Within `encoder.block.{i}.`.
_BLOCK = (
    (r"^layer\.0\.layer_norm\.weight$", "blocks.attention_norm.scale", SAME),
    (r"^layer\.0\.SelfAttention\.([qkvo])\.weight$", "blocks.attention.{0}.kernel", LINEAR),
    (r"^layer\.0\.SelfAttention\.relative_attention_bias\.weight$", "blocks.attention.relative_attention_bias", SAME),
    (r"^layer\.1\.layer_norm\.weight$", "blocks.feed_forward_norm.scale", SAME),
    (r"^layer\.1\.DenseReluDense\.(wi_0|wi_1|wo)\.weight$", "blocks.feed_forward.{0}.kernel", LINEAR),
)
# Ours -> transformers, for export: the inverse of the rules above (the alias is never written).
_TORCH_OF_TOP = {"token_embedding.embedding": TOKEN_TABLE, "final_norm.scale": "encoder.final_layer_norm.weight"}
_TORCH_OF_BLOCK = (
    (r"^blocks\.attention_norm\.scale$", "layer.0.layer_norm.weight"),
    (r"^blocks\.attention\.([qkvo])\.kernel$", "layer.0.SelfAttention.{0}.weight"),
    (r"^blocks\.attention\.relative_attention_bias$", "layer.0.SelfAttention.relative_attention_bias.weight"),
    (r"^blocks\.feed_forward_norm\.scale$", "layer.1.layer_norm.weight"),
    (r"^blocks\.feed_forward\.(wi_0|wi_1|wo)\.kernel$", "layer.1.DenseReluDense.{0}.weight"),
)


def target_of(key: str) -> Target | None:
    """Where a transformers key lands in our tree, or None if it has no place."""
    return match_rules(key, r"^encoder\.block\.(\d+)\.(.+)$", _TOP, _BLOCK)


def locate(key: str) -> Target | None:
    """Target of any accepted key (the protocol of `helios_jax.loading.module_from_tensors`)."""
    return target_of(key)


class UsedTokenTable:
    """A tensor reader that hides `shared.weight` when `encoder.embed_tokens.weight` is also stored,
    so that the encoder gets the table transformers' encoder reads."""

    def __init__(self, tensors):
        self._tensors = tensors
        names = list(tensors.keys())
        self._keys = [k for k in names if not (k == TOKEN_TABLE and TOKEN_TABLE_ALIAS in names)]

    def keys(self) -> list[str]:
        return self._keys

    def read(self, key: str):
        return self._tensors.read(key)

    def file_of(self, key: str):
        return getattr(self._tensors, "file_of", lambda _: "checkpoint")(key)

    def __getattr__(self, name: str):
        # Anything else (info, read_rows for sharded loading) is the wrapped reader's.
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._tensors, name)


def torch_key_of(path: str, layer: int | None = None) -> str:
    """The transformers key of our leaf `path` (and `layer`, for block parameters)."""
    if path in _TORCH_OF_TOP:
        return _TORCH_OF_TOP[path]
    for pattern, template in _TORCH_OF_BLOCK:
        match = re.match(pattern, path)
        if match and layer is not None:
            return f"encoder.block.{layer}." + template.format(*match.groups())
    raise KeyError(f"no transformers key for {path!r} (layer {layer})")


def transform_of(path: str) -> str:
    return LINEAR if path.endswith(".kernel") else SAME


def to_our_layout(array: np.ndarray, transform: str) -> np.ndarray:
    return array.T if transform == LINEAR else array


def to_torch_layout(array: np.ndarray, transform: str) -> np.ndarray:
    return array.T if transform == LINEAR else array
