"""Building blocks of the Wan2.1 VAE, channels last ([B, T, H, W, C]).

Causality: every layer that mixes frames takes the cache it returned for the previous piece of the
same video and returns the next one, so a video can be run frame by frame (or group by group) with
exactly the reference's results. `cache=None` marks the start of a segment: there the reference's
first-chunk rules apply (zero history; 3D resamplers pass frame 0 through their time conv
untouched). Caches have fixed shapes, so the pieces after the first run under one `lax.scan`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from helios_jax.kernels import dot_product_attention
from helios_jax import parallel
from helios_jax.models.layers import Dense, ones, param, silu, xavier_uniform, zeros

# Logical names of video activations; a mesh rule can map height/width to devices (spatial sharding).
VIDEO_AXES = ("batch", "frames", "height", "width", "channels")
# Causal 3x3x3 convs see two previous frames (temporal padding 2 in front, none behind).
CONTEXT_FRAMES = 2


def constrain(x: jax.Array) -> jax.Array:
    """Name the axes of a video activation: sharded by the activation rules on the active mesh
    (height over `seq`), a no-op without a mesh."""
    return parallel.constrain(x, VIDEO_AXES)


def with_context(x: jax.Array, cache: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """`x` behind its two previous frames (zeros at a segment start), and the cache for the next piece."""
    if cache is None:
        cache = jnp.zeros((x.shape[0], CONTEXT_FRAMES, *x.shape[2:]), x.dtype)
    full = jnp.concatenate([cache, x], axis=1)
    return full, full[:, -CONTEXT_FRAMES:]


class Conv3d(nnx.Module):
    """A 3D conv, VALID in time (callers put the causal context in front), zero-padded
    symmetrically in space. Kernel [kT, kH, kW, in, out] (torch's (out, in, kT, kH, kW) transposed)."""

    def __init__(self, in_dim: int, out_dim: int, kernel_size, *, time_stride: int = 1, dtype, rngs):
        kt, kh, kw = kernel_size
        self.dtype = dtype
        self.time_stride = time_stride
        self.spatial_padding = ((kh // 2, kh // 2), (kw // 2, kw // 2))
        axes = (None, None, None, "conv_in", "conv_out")
        self.kernel = param(rngs, xavier_uniform, (kt, kh, kw, in_dim, out_dim), dtype, axes)
        self.bias = param(rngs, zeros, (out_dim,), dtype, ("conv_out",))

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype),
            self.kernel[...],
            window_strides=(self.time_stride, 1, 1),
            padding=((0, 0), *self.spatial_padding),
            dimension_numbers=("NDHWC", "DHWIO", "NDHWC"),
            preferred_element_type=jnp.float32,
        )
        return (y + self.bias[...].astype(jnp.float32)).astype(self.dtype)


class CausalConv3d(Conv3d):
    """diffusers' `WanCausalConv3d` with temporal padding: two frames of context from the cache."""

    def __call__(self, x: jax.Array, cache: jax.Array | None) -> tuple[jax.Array, jax.Array]:
        full, cache = with_context(x, cache)
        return super().__call__(full), cache


class Conv2d(nnx.Module):
    """A per-frame 2D conv with explicit padding. Kernel [kH, kW, in, out]."""

    def __init__(self, in_dim: int, out_dim: int, *, stride: int, padding, dtype, rngs):
        self.dtype = dtype
        self.stride = stride
        self.padding = padding
        self.kernel = param(rngs, xavier_uniform, (3, 3, in_dim, out_dim), dtype, (None, None, "conv_in", "conv_out"))
        self.bias = param(rngs, zeros, (out_dim,), dtype, ("conv_out",))

    def __call__(self, x: jax.Array) -> jax.Array:
        b, t = x.shape[:2]
        y = jax.lax.conv_general_dilated(
            x.reshape(b * t, *x.shape[2:]).astype(self.dtype),
            self.kernel[...],
            window_strides=(self.stride, self.stride),
            padding=self.padding,
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            preferred_element_type=jnp.float32,
        )
        y = (y + self.bias[...].astype(jnp.float32)).astype(self.dtype)
        return y.reshape(b, t, *y.shape[1:])


class RMSNorm(nnx.Module):
    """`WanRMS_norm`: L2-normalise over channels (norm clamped at 1e-12), times sqrt(C) and gamma.
    Half-precision input is normalised in fp32 and rounded back before the scaling, as diffusers does."""

    def __init__(self, dim: int, *, dtype, rngs):
        self.scale = dim**0.5
        self.gamma = param(rngs, ones, (dim,), dtype, ("channels",))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        norm = jnp.sqrt(jnp.sum(jnp.square(x32), axis=-1, keepdims=True))
        normed = (x32 / jnp.maximum(norm, 1e-12)).astype(x.dtype)
        return normed * jnp.asarray(self.scale, x.dtype) * self.gamma[...].astype(x.dtype)


class ResidualBlock(nnx.Module):
    """norm-SiLU-conv twice plus a shortcut (a 1x1x1 conv when the width changes). Its cache is the
    post-norm-SiLU frames that feed conv1 and conv2."""

    def __init__(self, in_dim: int, out_dim: int, *, dtype, rngs):
        self.norm1 = RMSNorm(in_dim, dtype=dtype, rngs=rngs)
        self.conv1 = CausalConv3d(in_dim, out_dim, (3, 3, 3), dtype=dtype, rngs=rngs)
        self.norm2 = RMSNorm(out_dim, dtype=dtype, rngs=rngs)
        self.conv2 = CausalConv3d(out_dim, out_dim, (3, 3, 3), dtype=dtype, rngs=rngs)
        self.conv_shortcut = Conv3d(in_dim, out_dim, (1, 1, 1), dtype=dtype, rngs=rngs) if in_dim != out_dim else None

    def __call__(self, x: jax.Array, cache: dict | None) -> tuple[jax.Array, dict]:
        shortcut = x if self.conv_shortcut is None else self.conv_shortcut(x)
        x, cache1 = self.conv1(silu(self.norm1(x)), None if cache is None else cache["conv1"])
        x, cache2 = self.conv2(silu(self.norm2(x)), None if cache is None else cache["conv2"])
        return constrain(x + shortcut), {"conv1": cache1, "conv2": cache2}


class AttentionBlock(nnx.Module):
    """Single-head self-attention within each frame (no time mixing, no cache); qkv channels q|k|v."""

    def __init__(self, dim: int, *, dtype, rngs):
        self.norm = RMSNorm(dim, dtype=dtype, rngs=rngs)
        self.to_qkv = Dense(dim, 3 * dim, axes=("conv_in", "conv_out"), dtype=dtype, rngs=rngs)
        self.proj = Dense(dim, dim, axes=("conv_in", "conv_out"), dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, t, h, w, c = x.shape
        qkv = self.to_qkv(self.norm(x)).reshape(b * t, h * w, 3, 1, c)
        y = dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], impl="xla")
        return constrain(self.proj(y.reshape(b, t, h, w, c)) + x)


class Resample(nnx.Module):
    """`WanResample`: 2x down/up in space, and in the 3D modes 2x in time.

    downsample: zero-pad right/bottom by one, 3x3 conv stride 2; downsample3d then convolves time
    with stride 2 over [last frame of the previous piece] + frames (frame 0 of a segment passes).
    upsample: (3D: causal time conv to 2C channels, channel halves become two sub-frames; frame 0
    of a segment passes and is not context) then nearest 2x and a 3x3 conv to C/2 channels.
    """

    MODES = ("downsample2d", "downsample3d", "upsample2d", "upsample3d")

    def __init__(self, dim: int, mode: str, *, dtype, rngs):
        if mode not in self.MODES:
            raise ValueError(f"resample mode must be one of {self.MODES}, got {mode!r}")
        self.mode = mode
        if mode.startswith("up"):
            conv = Conv2d(dim, dim // 2, stride=1, padding=((1, 1), (1, 1)), dtype=dtype, rngs=rngs)
        else:
            conv = Conv2d(dim, dim, stride=2, padding=((0, 1), (0, 1)), dtype=dtype, rngs=rngs)
        # Index 1 as in diffusers' nn.Sequential: index 0 is the parameterless pad or upsample.
        self.resample = nnx.List([None, conv])
        if mode == "upsample3d":
            self.time_conv = CausalConv3d(dim, 2 * dim, (3, 1, 1), dtype=dtype, rngs=rngs)
        elif mode == "downsample3d":
            self.time_conv = Conv3d(dim, dim, (3, 1, 1), time_stride=2, dtype=dtype, rngs=rngs)
        else:
            self.time_conv = None

    def __call__(self, x: jax.Array, cache: jax.Array | None) -> tuple[jax.Array, jax.Array | None]:
        if self.mode == "upsample3d":
            x, cache = self._upsample_time(x, cache)
        if self.mode.startswith("up"):
            x = jnp.repeat(jnp.repeat(x, 2, axis=2), 2, axis=3)
        x = self.resample[1](x)
        if self.mode == "downsample3d":
            x, cache = self._downsample_time(x, cache)
        return constrain(x), cache

    def _upsample_time(self, x, cache):
        if cache is None:
            return x, jnp.zeros((x.shape[0], CONTEXT_FRAMES, *x.shape[2:]), x.dtype)
        y, cache = self.time_conv(x, cache)
        b, t, h, w, _ = y.shape
        c = x.shape[-1]
        y = y.reshape(b, t, h, w, 2, c).transpose(0, 1, 4, 2, 3, 5)  # sub-frame a, then b, per frame
        return y.reshape(b, 2 * t, h, w, c), cache

    def _downsample_time(self, x, cache):
        if cache is None:
            return x, x[:, -1:]
        return self.time_conv(jnp.concatenate([cache, x], axis=1)), x[:, -1:]


class MidBlock(nnx.Module):
    """Residual, attention, residual at the lowest resolution."""

    def __init__(self, dim: int, *, dtype, rngs):
        self.resnets = nnx.List([ResidualBlock(dim, dim, dtype=dtype, rngs=rngs) for _ in range(2)])
        self.attentions = nnx.List([AttentionBlock(dim, dtype=dtype, rngs=rngs)])

    def __call__(self, x: jax.Array, cache: dict | None) -> tuple[jax.Array, dict]:
        x, cache0 = self.resnets[0](x, None if cache is None else cache["resnets"][0])
        x = self.attentions[0](x)
        x, cache1 = self.resnets[1](x, None if cache is None else cache["resnets"][1])
        return x, {"resnets": [cache0, cache1]}
