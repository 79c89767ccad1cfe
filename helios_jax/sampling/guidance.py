"""Classifier-free guidance as the Helios variants use it (spec sampler.md §5).

The combination runs in the model output's dtype (bf16 for the released models), as the
reference's elementwise torch ops on bf16 do; only CFG-Zero*'s projection is reduced in fp32.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

KINDS = ("none", "cfg", "cfg_zero_star")


def guidance_kind(guidance_scale: float, is_cfg_zero_star: bool) -> str:
    """CFG is on iff the scale is above 1; CFG-Zero* when the pipeline config says so (Mid)."""
    if guidance_scale <= 1.0:
        return "none"
    return "cfg_zero_star" if is_cfg_zero_star else "cfg"


def classifier_free(cond: jax.Array, uncond: jax.Array, scale) -> jax.Array:
    """v_u + g (v_c - v_u)."""
    scale = jnp.asarray(scale, cond.dtype)
    return uncond + scale * (cond - uncond)


def zero_star_scale(cond: jax.Array, uncond: jax.Array) -> jax.Array:
    """a* = <v_c, v_u> / (|v_u|^2 + 1e-8) per batch item, reduced in fp32, in the outputs' dtype."""
    c = cond.reshape(cond.shape[0], -1).astype(jnp.float32)
    u = uncond.reshape(uncond.shape[0], -1).astype(jnp.float32)
    alpha = jnp.sum(c * u, axis=1) / (jnp.sum(u * u, axis=1) + 1e-8)
    return alpha.reshape((-1,) + (1,) * (cond.ndim - 1)).astype(cond.dtype)


def classifier_free_zero_star(cond: jax.Array, uncond: jax.Array, scale, zero_init) -> jax.Array:
    """a* v_u + g (v_c - a* v_u); exactly zero on zero-init steps (`zero_init` a traced bool)."""
    alpha = zero_star_scale(cond, uncond)
    scaled = uncond * alpha
    guided = scaled + jnp.asarray(scale, cond.dtype) * (cond - scaled)
    return jnp.where(zero_init, cond * 0.0, guided)


def combine(kind: str, cond: jax.Array, uncond: jax.Array | None, scale, zero_init) -> jax.Array:
    if kind == "none":
        return cond
    if kind == "cfg":
        return classifier_free(cond, uncond, scale)
    if kind == "cfg_zero_star":
        return classifier_free_zero_star(cond, uncond, scale, zero_init)
    raise ValueError(f"guidance kind must be one of {', '.join(KINDS)}; got {kind!r}")
