"""Transformer configuration: diffusers' `HeliosTransformer3DModel` fields plus our execution fields."""
from __future__ import annotations

import ml_collections

from helios_jax.models.config_builder import build_config, preset_overrides

# Defaults of diffusers' HeliosTransformer3DModel, which are the released 14B values (spec §1.1).
DIFFUSERS_FIELDS = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=40,
    attention_head_dim=128,
    in_channels=16,
    out_channels=16,
    text_dim=4096,
    freq_dim=256,
    ffn_dim=13824,
    num_layers=40,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",  # accepted, never read: q/k norms are always RMSNorm across heads
    eps=1e-6,
    added_kv_proj_dim=None,
    rope_dim=(44, 42, 42),
    rope_theta=10000.0,
    guidance_cross_attn=True,
    zero_history_timestep=True,
    has_multi_term_memory_patch=True,
    is_amplify_history=False,
    history_scale_mode="per_head",
)

# Execution choices that config.json does not carry.
EXECUTION_FIELDS = dict(
    dtype="bfloat16",  # parameter and activation dtype; fp32 islands follow the reference
    attention_impl="auto",  # the fastest measured kernel per backend (xla on CPU): helios_jax.kernels
    norm_rope_impl="auto",  # q/k RMSNorm + RoPE: xla, or pallas_tpu (one fused kernel; auto: on a TPU)
    remat_policy="none",  # none | full | dots | dots_with_no_batch_dims | offload_dots
)

# The diffusers unit-test model (hf-internal-testing/tiny-helios-base-transformer), in fp32.
TINY = dict(
    num_attention_heads=2,
    attention_head_dim=12,
    in_channels=4,
    out_channels=4,
    text_dim=16,
    ffn_dim=32,
    num_layers=2,
    rope_dim=(4, 4, 4),
    dtype="float32",
)

# "tiny-random": the tiny transformer as `--model tiny-random` pairs it with the tiny UMT5 (d_model 64),
# so it trains on data prepared with `helios-jax prepare-data --model tiny-random`.
TINY_RANDOM = {**TINY, "text_dim": 64}
PRESETS = {"helios_14b": {}, "tiny": TINY, "tiny-random": TINY_RANDOM}

# Keys the official (training) class writes into config.json. They change nothing in the released
# model, except these two, whose paths this port does not have.
OFFICIAL_ONLY_UNSUPPORTED = ("restrict_self_attn", "is_amplify_history")


def transformer_config(**overrides) -> ml_collections.ConfigDict:
    """The 14B config with `overrides` applied; an unknown field is an error."""
    return build_config("transformer", {**DIFFUSERS_FIELDS, **EXECUTION_FIELDS}, overrides, validate,
                        tuple_fields=("patch_size", "rope_dim"))


def preset(name: str, **overrides) -> ml_collections.ConfigDict:
    return transformer_config(**{**preset_overrides("model", PRESETS, name), **overrides})


def from_diffusers_json(config_json: dict, **overrides) -> ml_collections.ConfigDict:
    """Config from a diffusers `transformer/config.json` dict. Extra keys (`_class_name`, the
    official class's training-only keys, ...) are ignored; a flag this port does not implement
    is refused."""
    for key in OFFICIAL_ONLY_UNSUPPORTED:
        if config_json.get(key):
            raise ValueError(
                f"config.json sets {key}=true: that path of the official training module is not "
                "part of the released Helios models and is not implemented"
            )
    fields = {k: v for k, v in config_json.items() if k in DIFFUSERS_FIELDS}
    return transformer_config(**fields, **overrides)


def to_diffusers_json(config) -> dict:
    """The diffusers `transformer/config.json` of `config` (the inverse of `from_diffusers_json`):
    what a folder written from a trained model carries so diffusers and `helios_jax.load` read it."""
    fields = {k: list(config[k]) if isinstance(config[k], tuple) else config[k] for k in DIFFUSERS_FIELDS}
    return {"_class_name": "HeliosTransformer3DModel", **fields}


# The training flags a Helios run starts with from a Wan2.1 transformer (training spec §1 item 1);
# every other Helios field keeps its default.
HELIOS_TRAINING_FLAGS = dict(has_multi_term_memory_patch=True, zero_history_timestep=True, guidance_cross_attn=True)


def wan_rope_dim(attention_head_dim: int) -> tuple[int, int, int]:
    """Wan's split of a head's channels between t, h and w (diffusers `WanRotaryPosEmbed`)."""
    spatial = 2 * (attention_head_dim // 6)
    return (attention_head_dim - 2 * spatial, spatial, spatial)


def from_wan_json(config_json: dict, **overrides) -> ml_collections.ConfigDict:
    """Helios config from a diffusers `WanTransformer3DModel` config.json (the Wan2.1 T2V
    transformer Helios training starts from): its shape, Wan's RoPE split and the Helios training flags.
    The image (I2V) and learned-position paths of Wan are refused: Helios has neither."""
    for key in ("image_dim", "added_kv_proj_dim", "pos_embed_seq_len"):
        if config_json.get(key) is not None:
            raise ValueError(f"WanTransformer3DModel with {key}={config_json[key]!r} (an I2V/FLF2V model) "
                             "is not a Helios initialisation source; use a Wan2.1 T2V transformer")
    if config_json.get("qk_norm", "rms_norm_across_heads") != "rms_norm_across_heads":
        raise ValueError(f"WanTransformer3DModel qk_norm={config_json['qk_norm']!r}: only rms_norm_across_heads "
                         "is implemented")
    fields = {k: v for k, v in config_json.items() if k in DIFFUSERS_FIELDS and k != "added_kv_proj_dim"}
    if fields.get("out_channels") is None:  # Wan: out_channels or in_channels
        fields["out_channels"] = fields.get("in_channels", DIFFUSERS_FIELDS["in_channels"])
    head_dim = fields.get("attention_head_dim", DIFFUSERS_FIELDS["attention_head_dim"])
    return transformer_config(**{**fields, "rope_dim": wan_rope_dim(head_dim), **HELIOS_TRAINING_FLAGS,
                                 **overrides})


def validate(config: ml_collections.ConfigDict) -> None:
    for key in OFFICIAL_ONLY_UNSUPPORTED:
        if config.get(key):
            raise ValueError(f"{key}=true is not supported (official-module-only path, spec §2.9)")
    if sum(config.rope_dim) != config.attention_head_dim:
        raise ValueError(
            f"rope_dim {tuple(config.rope_dim)} must sum to attention_head_dim {config.attention_head_dim}"
        )
    if config.added_kv_proj_dim is not None:
        raise ValueError("added_kv_proj_dim (the Wan I2V image path) is not used by Helios and not supported")
    if config.norm_rope_impl not in ("auto", "xla", "pallas_tpu"):
        raise ValueError(f"norm_rope_impl must be auto, xla or pallas_tpu, got {config.norm_rope_impl!r}")
    if config.dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {config.dtype!r}")


def history_patch_kernels(config) -> tuple[tuple[int, int, int], ...]:
    """Kernels of patch_short/mid/long: 1x, 2x and 4x the main patch (spec §2.2)."""
    return tuple(tuple(m * p for p in config.patch_size) for m in (1, 2, 4))
