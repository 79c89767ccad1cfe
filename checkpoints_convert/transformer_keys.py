"""Key and layout map between diffusers' `HeliosTransformer3DModel` state dict and our NNX tree.

A diffusers key such as `blocks.7.attn1.to_out.0.weight` maps to the NNX path
`blocks.attn1.to_out.kernel`, layer 7 of the stacked leaf, stored transposed. Older names (spec §3.2:
the top-level `scale_shift_table`, `clean_patch_embedding.*`, `multi_term_memory_patch.*`, and the
original Wan2.1 names) are rewritten to the current diffusers names first.
"""
from __future__ import annotations

import re

import numpy as np

from checkpoints_convert.key_rules import IGNORED_KEY, Target, match_rules  # noqa: F401 (re-exported)

# Legacy name -> current diffusers name; applied in order, each at most once.
LEGACY_ALIASES = (
    (r"^scale_shift_table$", "norm_out.scale_shift_table"),
    (r"^clean_patch_embedding\.proj_2x\.", "patch_mid."),
    (r"^clean_patch_embedding\.proj_4x\.", "patch_long."),
    (r"^clean_patch_embedding\.proj\.", "patch_short."),
    (r"^multi_term_memory_patch\.(patch_short|patch_mid|patch_long)\.", r"\1."),
    # Original (non-diffusers) Wan2.1 names, the initialisation source of Helios.
    (r"^time_embedding\.0\.", "condition_embedder.time_embedder.linear_1."),
    (r"^time_embedding\.2\.", "condition_embedder.time_embedder.linear_2."),
    (r"^time_projection\.1\.", "condition_embedder.time_proj."),
    (r"^text_embedding\.0\.", "condition_embedder.text_embedder.linear_1."),
    (r"^text_embedding\.2\.", "condition_embedder.text_embedder.linear_2."),
    (r"^head\.head\.", "proj_out."),
    (r"^head\.modulation$", "norm_out.scale_shift_table"),
    (r"^(blocks\.\d+)\.self_attn\.", r"\1.attn1."),
    (r"^(blocks\.\d+)\.cross_attn\.", r"\1.attn2."),
    (r"^(blocks\.\d+\.attn[12])\.([qkv])\.", r"\1.to_\2."),
    (r"^(blocks\.\d+\.attn[12])\.o\.", r"\1.to_out.0."),
    (r"^(blocks\.\d+)\.norm3\.", r"\1.norm2."),  # Wan's affine cross-attention norm is diffusers' norm2
    (r"^(blocks\.\d+)\.ffn\.0\.", r"\1.ffn.net.0.proj."),
    (r"^(blocks\.\d+)\.ffn\.2\.", r"\1.ffn.net.2."),
    (r"^(blocks\.\d+)\.modulation$", r"\1.scale_shift_table"),
)

# Keys diffusers itself ignores on load.
IGNORED = (r"(^|\.)norm_added_q\.",)

# Layout transforms, torch -> ours. Each has an exact inverse in `to_torch_layout`.
LINEAR, CONV3D, SQUEEZE0, SAME = "linear", "conv3d", "squeeze0", "same"

# (diffusers suffix pattern, our path template, transform). `{m}` is the module path.
_TOP = (
    (r"^(patch_embedding|patch_short|patch_mid|patch_long)\.weight$", "{0}.kernel", CONV3D),
    (r"^(patch_embedding|patch_short|patch_mid|patch_long)\.bias$", "{0}.bias", SAME),
    (r"^condition_embedder\.(time_embedder|text_embedder)\.(linear_[12])\.weight$",
     "condition_embedder.{0}.{1}.kernel", LINEAR),
    (r"^condition_embedder\.(time_embedder|text_embedder)\.(linear_[12])\.bias$",
     "condition_embedder.{0}.{1}.bias", SAME),
    (r"^condition_embedder\.time_proj\.weight$", "condition_embedder.time_proj.kernel", LINEAR),
    (r"^condition_embedder\.time_proj\.bias$", "condition_embedder.time_proj.bias", SAME),
    (r"^norm_out\.scale_shift_table$", "norm_out.scale_shift_table", SQUEEZE0),
    (r"^proj_out\.weight$", "proj_out.kernel", LINEAR),
    (r"^proj_out\.bias$", "proj_out.bias", SAME),
)
_BLOCK = (
    (r"^(attn[12])\.to_([qkv])\.weight$", "blocks.{0}.to_{1}.kernel", LINEAR),
    (r"^(attn[12])\.to_([qkv])\.bias$", "blocks.{0}.to_{1}.bias", SAME),
    (r"^(attn[12])\.to_out\.0\.weight$", "blocks.{0}.to_out.kernel", LINEAR),
    (r"^(attn[12])\.to_out\.0\.bias$", "blocks.{0}.to_out.bias", SAME),
    (r"^(attn[12])\.norm_([qk])\.weight$", "blocks.{0}.norm_{1}.scale", SAME),
    (r"^norm2\.weight$", "blocks.norm2.scale", SAME),
    (r"^norm2\.bias$", "blocks.norm2.bias", SAME),
    (r"^ffn\.net\.0\.proj\.weight$", "blocks.ffn.linear_in.kernel", LINEAR),
    (r"^ffn\.net\.0\.proj\.bias$", "blocks.ffn.linear_in.bias", SAME),
    (r"^ffn\.net\.2\.weight$", "blocks.ffn.linear_out.kernel", LINEAR),
    (r"^ffn\.net\.2\.bias$", "blocks.ffn.linear_out.bias", SAME),
    (r"^scale_shift_table$", "blocks.scale_shift_table", SQUEEZE0),
)


def canonical_key(key: str) -> str:
    """Rewrite a legacy key to its current diffusers name (unchanged if already current)."""
    for pattern, replacement in LEGACY_ALIASES:
        key = re.sub(pattern, replacement, key)
    return key


def is_ignored(key: str) -> bool:
    return any(re.search(p, key) for p in IGNORED)


def target_of(key: str) -> Target | None:
    """Where a (canonical) diffusers key lands in our tree, or None if it has no place."""
    return match_rules(key, r"^blocks\.(\d+)\.(.+)$", _TOP, _BLOCK)


def locate(key: str) -> Target | None:
    """Target of any accepted key (legacy names included); IGNORED for keys the reference drops."""
    canonical = canonical_key(key)
    return IGNORED_KEY if is_ignored(canonical) else target_of(canonical)


# Our module and parameter names that differ from diffusers' (everything else is the same dotted path).
_TORCH_MODULE_NAMES = {"to_out": "to_out.0", "linear_in": "net.0.proj", "linear_out": "net.2"}
_TORCH_PARAM_NAMES = {"kernel": "weight", "scale": "weight"}


def diffusers_module_name(path, layer: int | None = None) -> str:
    """diffusers' module name of our module at `path` (a tuple of names), with the layer index for
    the stacked blocks: ("blocks", "ffn", "linear_in"), 3 -> "blocks.3.ffn.net.0.proj"."""
    names = [_TORCH_MODULE_NAMES.get(str(p), str(p)) for p in path]
    if names and names[0] == "blocks":
        names.insert(1, str(layer))
    return ".".join(names)


def torch_key_of(path: str, layer: int | None) -> tuple[str, str]:
    """(diffusers key, layout transform) of our leaf `path` (layer `layer` of a stacked leaf): the
    inverse of `target_of`, checked against it."""
    *modules, param = path.split(".")
    key = ".".join(filter(None, [diffusers_module_name(modules, layer), _TORCH_PARAM_NAMES.get(param, param)]))
    target = target_of(key)
    if target is None or target.path != path or target.layer != layer:
        raise KeyError(f"no diffusers key for parameter {path}" + (f" layer {layer}" if layer is not None else ""))
    return key, target.transform


def to_our_layout(array: np.ndarray, transform: str) -> np.ndarray:
    if transform == LINEAR:
        return array.T
    if transform == CONV3D:  # [O, I, kT, kH, kW] -> [kT, kH, kW, I, O]
        return array.transpose(2, 3, 4, 1, 0)
    if transform == SQUEEZE0:
        return array.reshape(array.shape[1:])
    return array


def to_torch_layout(array: np.ndarray, transform: str) -> np.ndarray:
    if transform == LINEAR:
        return array.T
    if transform == CONV3D:
        return array.transpose(4, 3, 0, 1, 2)
    if transform == SQUEEZE0:
        return array[None]
    return array
