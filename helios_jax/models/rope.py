"""3D rotary position embedding of Helios (spec §2.4).

Tables hold one (cos, sin) value per channel pair: [B, T, H, W, head_dim // 2] each, channels ordered
[t | y | x]. The reference duplicates every value for both members of a pair; keeping one per pair is
the same table. Everything here is fp32.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from helios_jax.kernels.norm_rope_math import apply_rope, lane_tables, pair_tables  # noqa: F401 - used as rope.*
from helios_jax.models.layers import pad_end_to_multiple


def axis_frequencies(dim: int, theta: float) -> jax.Array:
    """theta^(-2j/dim) for j = 0 .. dim/2 - 1, in fp32."""
    exponents = jnp.arange(0, dim, 2, dtype=jnp.float32)[: dim // 2] / dim
    return 1.0 / (theta**exponents)


def rope_table(frame_indices: jax.Array, height: int, width: int, rope_dim: Sequence[int], theta: float):
    """(cos, sin), each [B, T, H, W, sum(rope_dim) // 2], for frames `frame_indices` [B, T] on an
    H x W grid of 0-based integer positions."""
    frame_indices = frame_indices.astype(jnp.float32)
    b, t = frame_indices.shape
    positions = (
        jnp.broadcast_to(frame_indices[:, :, None, None], (b, t, height, width)),
        jnp.broadcast_to(jnp.arange(height, dtype=jnp.float32)[:, None], (b, t, height, width)),
        jnp.broadcast_to(jnp.arange(width, dtype=jnp.float32)[None, :], (b, t, height, width)),
    )
    angles = jnp.concatenate(
        [pos[..., None] * axis_frequencies(dim, theta) for pos, dim in zip(positions, rope_dim)], axis=-1
    )
    return jnp.cos(angles), jnp.sin(angles)


def pool_table(table: jax.Array, kernel: Sequence[int]) -> jax.Array:
    """Replicate-pad T, H, W to multiples of `kernel`, then average each group: the reference pools
    cos and sin values (not angles), which both moves tokens to the group centre and damps high
    frequencies. Kept literally for parity."""
    table = pad_end_to_multiple(table, kernel, axes=(1, 2, 3))
    b, t, h, w, c = table.shape
    kt, kh, kw = kernel
    grouped = table.reshape(b, t // kt, kt, h // kh, kh, w // kw, kw, c)
    return grouped.mean(axis=(2, 4, 6))


def flatten_tokens(x: jax.Array) -> jax.Array:
    """[B, T, H, W, C] -> [B, T*H*W, C] in row-major (t, h, w) order, as torch's flatten(2)."""
    return x.reshape(x.shape[0], -1, x.shape[-1])
