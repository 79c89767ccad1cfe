"""VAE configuration: diffusers' `AutoencoderKLWan` fields (the Wan2.1 values) plus our dtype."""
from __future__ import annotations

import ml_collections

from helios_jax.models.config_builder import build_config, preset_overrides

# The latent statistics of the Wan2.1 VAE (spec vae_and_text.md A.8); also diffusers' defaults.
WAN21_LATENTS_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
WAN21_LATENTS_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)  # fmt: skip

# Defaults of diffusers' AutoencoderKLWan, which are the Wan2.1 VAE that Helios ships (spec A.1).
DIFFUSERS_FIELDS = dict(
    base_dim=96,
    decoder_base_dim=None,
    z_dim=16,
    dim_mult=(1, 2, 4, 4),
    num_res_blocks=2,
    attn_scales=(),
    temperal_downsample=(False, True, True),  # sic: diffusers' spelling
    dropout=0.0,
    latents_mean=WAN21_LATENTS_MEAN,
    latents_std=WAN21_LATENTS_STD,
    is_residual=False,
    in_channels=3,
    out_channels=3,
    patch_size=None,
    scale_factor_temporal=4,
    scale_factor_spatial=8,
)

# Helios runs the VAE in fp32 (spec A.7); bf16 keeps the norm statistics in fp32 as diffusers does.
EXECUTION_FIELDS = dict(dtype="float32")

# Small configs for tests and the tiny-random model. "tiny" has the real model's structure
# (every block type, strides 4 in time and 8 in space) at a width of 8.
PRESETS = {
    "wan2.1": {},
    "tiny": dict(base_dim=8, z_dim=4, latents_mean=(0.0,) * 4, latents_std=(1.0,) * 4),
}


def vae_config(**overrides) -> ml_collections.ConfigDict:
    """The Wan2.1 VAE config with `overrides` applied; an unknown field is an error."""
    tuple_fields = ("dim_mult", "attn_scales", "temperal_downsample", "latents_mean", "latents_std")
    return build_config("VAE", {**DIFFUSERS_FIELDS, **EXECUTION_FIELDS}, overrides, validate, tuple_fields)


def preset(name: str, **overrides) -> ml_collections.ConfigDict:
    return vae_config(**{**preset_overrides("VAE", PRESETS, name), **overrides})


def from_diffusers_json(config_json: dict, **overrides) -> ml_collections.ConfigDict:
    """Config from a diffusers `vae/config.json` dict; keys diffusers adds (`_class_name`, ...) are ignored."""
    fields = {k: v for k, v in config_json.items() if k in DIFFUSERS_FIELDS}
    return vae_config(**fields, **overrides)


def validate(config: ml_collections.ConfigDict) -> None:
    """Refuse the Wan2.2 options and the settings diffusers itself cannot run (spec A.1, A.13)."""
    if config.is_residual:
        raise ValueError("is_residual=true is the Wan2.2 VAE; only the Wan2.1 VAE is supported")
    if config.patch_size is not None:
        raise ValueError("patch_size is a Wan2.2 VAE option; only the Wan2.1 VAE (patch_size null) is supported")
    if config.attn_scales:
        raise ValueError("attn_scales must be empty (diffusers' encoder cannot run with extra attention blocks)")
    if config.dropout != 0.0:
        raise ValueError("dropout must be 0 (the VAE is frozen in Helios)")
    if config.decoder_base_dim not in (None, config.base_dim):
        raise ValueError("decoder_base_dim must equal base_dim (a Wan2.2 option)")
    if len(config.temperal_downsample) != len(config.dim_mult) - 1:
        raise ValueError(
            f"temperal_downsample needs {len(config.dim_mult) - 1} entries (one per resample level), "
            f"got {len(config.temperal_downsample)}"
        )
    if config.dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {config.dtype!r}")


def temporal_stride(config) -> int:
    return 2 ** sum(bool(t) for t in config.temperal_downsample)


def spatial_stride(config) -> int:
    return 2 ** (len(config.dim_mult) - 1)
