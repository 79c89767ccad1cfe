"""The elementwise math of the q/k RMSNorm + RoPE: the XLA path of the models and the reference the
fused TPU kernel (norm_rope_tpu.py) is checked against. Here, below the models, so that the kernel
and the models share it without the kernels importing a model module."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """RMSNorm over the last axis: fp32 statistics, normalised value rounded to x's dtype, times scale."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
    return normed.astype(x.dtype) * scale.astype(x.dtype)


def lane_tables(cos: jax.Array, sin: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-pair tables [..., head_dim/2] -> per-channel tables [..., head_dim]: cos for both members
    of a pair, sin signed by the member's term (-sin for the first, +sin for the second), so that
    out = x * cos + partner(x) * sin (the fused TPU kernel's form of `apply_rope`)."""
    cos_full = jnp.repeat(cos, 2, axis=-1)
    sin_signed = jnp.stack([-sin, sin], axis=-1).reshape(*sin.shape[:-1], -1)
    return cos_full, sin_signed


def pair_tables(cos: jax.Array, sin: jax.Array, head_dim: int) -> tuple[jax.Array, jax.Array]:
    """Per-pair tables from either form (the inverse of `lane_tables`)."""
    if cos.shape[-1] == head_dim:
        return cos[..., 0::2], sin[..., 1::2]
    return cos, sin


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate interleaved pairs (2i, 2i+1) of x [B, L, heads, head_dim] by tables [B, L, head_dim/2].

    fp32 math, result rounded to x's dtype (the GPT-J convention, not rotate-half)."""
    x32 = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
    x1, x2 = x32[..., 0], x32[..., 1]
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    out = jnp.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)
