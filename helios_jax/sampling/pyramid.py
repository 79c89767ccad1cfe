"""Pyramid sampling's resolution changes (spec sampler.md §4): the initial downsample of a chunk's
noise, the nearest upsample between stages and the block-correlated noise that re-noises it.

All tensors are channels first, [B, C, T, h, w], as the pipeline holds latents.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

BLOCK = 2  # the transformer's spatial patch: re-noising is correlated within each 2x2 block


def downsample_noise(noise: jax.Array, times: int) -> jax.Array:
    """`times` halvings of h and w, each a bilinear resize by exactly 1/2 times 2.

    With align_corners=False and an exact factor of 2, bilinear sampling reads the centre of each
    2x2 block, so it is a 2x2 mean; the factor 2 keeps unit variance. (jax.image.resize would
    antialias and read a wider footprint.) Each pass runs in fp32 as the reference's does.
    """
    x = noise.astype(jnp.float32)
    for _ in range(times):
        b, c, t, h, w = x.shape
        if h % 2 or w % 2:
            raise ValueError(f"pyramid downsample needs even latent height and width; got {h}x{w}")
        x = x.reshape(b, c, t, h // 2, 2, w // 2, 2).mean(axis=(4, 6)) * 2
    return x


def upsample_nearest(x: jax.Array) -> jax.Array:
    """Each value repeated over a 2x2 block (nearest-neighbour 2x in h and w)."""
    return jnp.repeat(jnp.repeat(x, 2, axis=3), 2, axis=4)


def renoise_coefficients(ori_start_sigma: float, gamma: float) -> tuple[float, float]:
    """(alpha, beta) of `alpha * upsampled + beta * block_noise` entering a stage whose original
    start sigma is `ori_start_sigma` (stage 1: 0.600120, 0.692612 with gamma = 1/3)."""
    signal = 1 - ori_start_sigma
    alpha = 1 / (math.sqrt(1 + (1 / gamma)) * (1 - signal) + signal)
    beta = alpha * (1 - signal) / math.sqrt(gamma)
    return alpha, beta


def block_noise_factor(gamma: float) -> np.ndarray:
    """L^T for z @ L^T, L the Cholesky factor of (1+gamma) I - gamma 11^T + 1e-8 I (4x4).

    The covariance is singular up to the jitter, which fp32 cannot resolve; the factor is computed
    in float64 and then rounded to fp32 (spec §4 numerics note).
    """
    size = BLOCK * BLOCK
    cov = np.eye(size) * (1 + gamma) - np.ones((size, size)) * gamma + np.eye(size) * 1e-8
    return np.linalg.cholesky(cov).T.astype(np.float32)


def block_noise_count(shape: tuple[int, ...]) -> int:
    """Rows of the standard-normal draw z ([rows, 4]) for block noise of `shape` [B, C, T, h, w]."""
    b, c, t, h, w = shape
    return b * c * t * (h // BLOCK) * (w // BLOCK)


def block_noise(z: jax.Array, shape: tuple[int, ...], factor: jax.Array) -> jax.Array:
    """Correlate the draw z [rows, 4] within 2x2 blocks and lay it out as `shape`: block entry
    j = 2*dy + dx fills pixel (2*bi + dy, 2*bj + dx)."""
    b, c, t, h, w = shape
    if z.shape != (block_noise_count(shape), BLOCK * BLOCK):
        raise ValueError(f"block noise draw must be [{block_noise_count(shape)}, 4] for {shape}; got {tuple(z.shape)}")
    noise = jnp.asarray(z, jnp.float32) @ factor
    noise = noise.reshape(b, c, t, h // BLOCK, w // BLOCK, BLOCK, BLOCK)
    return noise.transpose(0, 1, 2, 3, 5, 4, 6).reshape(shape)
