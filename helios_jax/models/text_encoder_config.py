"""Text encoder configuration: the fields of transformers' `UMT5Config` that the encoder reads, plus
our execution dtype (spec vae_and_text.md B.1, B.4)."""
from __future__ import annotations

import ml_collections

from helios_jax.models.config_builder import build_config, preset_overrides

# The encoder-side fields of transformers' UMT5Config, at the google/umt5-xxl values that Wan2.1 and
# Helios ship in `text_encoder/config.json`.
TRANSFORMERS_FIELDS = dict(
    vocab_size=256384,  # 256,300 tokenizer ids, padded to a multiple of 128
    d_model=4096,
    d_kv=64,
    d_ff=10240,
    num_layers=24,
    num_heads=64,
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    layer_norm_epsilon=1e-6,
    feed_forward_proj="gated-gelu",
)

# bf16 is what Helios runs (HeliosPipeline.from_pretrained(..., torch_dtype=bf16), spec B.4).
EXECUTION_FIELDS = dict(dtype="bfloat16")

# Two small shapes for CPU tests: the spec's B.9 shape, and one whose attention width (heads x d_kv)
# differs from d_model and whose buckets saturate at a shorter distance.
TINY = dict(vocab_size=320, d_model=64, d_kv=16, d_ff=96, num_layers=3, num_heads=4, dtype="float32")
TINY_NARROW = dict(vocab_size=256, d_model=48, d_kv=8, d_ff=80, num_layers=2, num_heads=4,
                   relative_attention_num_buckets=16, relative_attention_max_distance=20, dtype="float32")

PRESETS = {"umt5_xxl": {}, "tiny": TINY, "tiny_narrow": TINY_NARROW}

# The only feed-forward that UMT5-XXL uses: transformers maps it to gated `gelu_new` (tanh GELU).
SUPPORTED_FEED_FORWARD = ("gated-gelu",)


def text_encoder_config(**overrides) -> ml_collections.ConfigDict:
    """The UMT5-XXL encoder config with `overrides` applied; an unknown field is an error."""
    return build_config("text encoder", {**TRANSFORMERS_FIELDS, **EXECUTION_FIELDS}, overrides, validate)


def preset(name: str, **overrides) -> ml_collections.ConfigDict:
    return text_encoder_config(**{**preset_overrides("text encoder", PRESETS, name), **overrides})


def from_transformers_json(config_json: dict, **overrides) -> ml_collections.ConfigDict:
    """Config from a transformers `UMT5EncoderModel` config.json dict; keys the encoder does not read
    (decoder fields, dropout, token ids, ...) are ignored."""
    if config_json.get("is_decoder"):
        raise ValueError("is_decoder=true: this is a decoder stack, not a UMT5 encoder")
    fields = {k: v for k, v in config_json.items() if k in TRANSFORMERS_FIELDS}
    return text_encoder_config(**fields, **overrides)


def validate(config: ml_collections.ConfigDict) -> None:
    if config.feed_forward_proj not in SUPPORTED_FEED_FORWARD:
        raise ValueError(
            f"feed_forward_proj={config.feed_forward_proj!r} is not supported; UMT5-XXL uses 'gated-gelu'"
        )
    if config.dtype == "float16":
        # transformers keeps `wo` in fp32 and clamps activations for fp16 only, which changes the
        # residual dtype mid-stack; Helios runs bf16, so that path is not reproduced.
        raise ValueError("dtype float16 is not supported for the text encoder; use bfloat16 or float32")
    if config.dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype must be float32 or bfloat16, got {config.dtype!r}")
