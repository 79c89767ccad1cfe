"""The Wan2.1 VAE (diffusers' `AutoencoderKLWan`) in Flax NNX, channels last inside.

Public calls take and return diffusers' layouts ([B, C, T, H, W]):
  vae.encode(x) -> posterior mean; vae.encode_posterior(x) -> DiagonalGaussian;
  vae.decode(z) -> frames in [-1, 1]; vae.decode_start / decode_continue -> the same frames in pieces.

Execution follows the reference's causal loop: encode takes frame 0 alone, then groups of 4 frames
(trailing frames that do not fill a group are dropped, as in diffusers); decode takes one latent
frame at a time. The first piece runs once, the rest under a `lax.scan` carrying the per-layer
caches, so decoding a 9-latent chunk is one compiled program reused for every chunk.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx, struct

from helios_jax.models.layers import silu
from helios_jax.models.vae_blocks import CausalConv3d, Conv3d, MidBlock, Resample, ResidualBlock, RMSNorm
from helios_jax.models.vae_config import validate

# diffusers' encode loop: frame 0 alone, then 4 frames per step whatever the temporal stride.
ENCODE_GROUP = 4


def _part(cache, name):
    return None if cache is None else cache[name]


class Encoder(nnx.Module):
    """`WanEncoder3d`: conv_in, a flat list of residual blocks and downsamplers, mid block, head."""

    def __init__(self, config, *, dtype, rngs):
        dims = [config.base_dim * m for m in (1, *config.dim_mult)]
        kw = dict(dtype=dtype, rngs=rngs)
        self.conv_in = CausalConv3d(config.in_channels, dims[0], (3, 3, 3), **kw)
        blocks = []
        for level, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(config.num_res_blocks):
                blocks.append(ResidualBlock(in_dim, out_dim, **kw))
                in_dim = out_dim
            if level < len(config.dim_mult) - 1:
                mode = "downsample3d" if config.temperal_downsample[level] else "downsample2d"
                blocks.append(Resample(out_dim, mode, **kw))
        self.down_blocks = nnx.List(blocks)
        self.mid_block = MidBlock(dims[-1], **kw)
        self.norm_out = RMSNorm(dims[-1], **kw)
        self.conv_out = CausalConv3d(dims[-1], 2 * config.z_dim, (3, 3, 3), **kw)

    def __call__(self, x: jax.Array, cache: dict | None) -> tuple[jax.Array, dict]:
        x, conv_in = self.conv_in(x, _part(cache, "conv_in"))
        down = []
        for i, block in enumerate(self.down_blocks):
            x, block_cache = block(x, None if cache is None else cache["down_blocks"][i])
            down.append(block_cache)
        x, mid = self.mid_block(x, _part(cache, "mid_block"))
        x, conv_out = self.conv_out(silu(self.norm_out(x)), _part(cache, "conv_out"))
        return x, {"conv_in": conv_in, "down_blocks": down, "mid_block": mid, "conv_out": conv_out}


class UpBlock(nnx.Module):
    """`WanUpBlock`: num_res_blocks + 1 residual blocks, then an optional upsampler."""

    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, mode: str | None, *, dtype, rngs):
        dims = [in_dim] + [out_dim] * (num_res_blocks + 1)
        kw = dict(dtype=dtype, rngs=rngs)
        self.resnets = nnx.List([ResidualBlock(a, b, **kw) for a, b in zip(dims[:-1], dims[1:])])
        self.upsamplers = nnx.List([Resample(out_dim, mode, **kw)]) if mode else None

    def __call__(self, x: jax.Array, cache: dict | None) -> tuple[jax.Array, dict]:
        resnets = []
        for i, resnet in enumerate(self.resnets):
            x, block_cache = resnet(x, None if cache is None else cache["resnets"][i])
            resnets.append(block_cache)
        upsampler = None
        if self.upsamplers is not None:
            x, upsampler = self.upsamplers[0](x, _part(cache, "upsampler"))
        return x, {"resnets": resnets, "upsampler": upsampler}


class Decoder(nnx.Module):
    """`WanDecoder3d`: conv_in, mid block, up blocks (each upsampler halves the width), head."""

    def __init__(self, config, *, dtype, rngs):
        mult = config.dim_mult
        dims = [config.base_dim * m for m in (mult[-1], *mult[::-1])]
        temporal_upsample = tuple(config.temperal_downsample)[::-1]
        kw = dict(dtype=dtype, rngs=rngs)
        self.conv_in = CausalConv3d(config.z_dim, dims[0], (3, 3, 3), **kw)
        self.mid_block = MidBlock(dims[0], **kw)
        blocks = []
        for level, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            if level > 0:
                in_dim //= 2  # the previous upsampler halved the width
            mode = None
            if level < len(mult) - 1:
                mode = "upsample3d" if temporal_upsample[level] else "upsample2d"
            blocks.append(UpBlock(in_dim, out_dim, config.num_res_blocks, mode, **kw))
        self.up_blocks = nnx.List(blocks)
        self.norm_out = RMSNorm(dims[-1], **kw)
        self.conv_out = CausalConv3d(dims[-1], config.out_channels, (3, 3, 3), **kw)

    def __call__(self, x: jax.Array, cache: dict | None) -> tuple[jax.Array, dict]:
        x, conv_in = self.conv_in(x, _part(cache, "conv_in"))
        x, mid = self.mid_block(x, _part(cache, "mid_block"))
        up = []
        for i, block in enumerate(self.up_blocks):
            x, block_cache = block(x, None if cache is None else cache["up_blocks"][i])
            up.append(block_cache)
        x, conv_out = self.conv_out(silu(self.norm_out(x)), _part(cache, "conv_out"))
        return x, {"conv_in": conv_in, "mid_block": mid, "up_blocks": up, "conv_out": conv_out}


@struct.dataclass
class DiagonalGaussian:
    """The encoder's posterior (diffusers' `DiagonalGaussianDistribution`), channels first."""

    mean: jax.Array
    logvar: jax.Array  # already clamped to [-30, 20]

    @property
    def std(self) -> jax.Array:
        return jnp.exp(0.5 * self.logvar)

    def mode(self) -> jax.Array:
        return self.mean

    def sample(self, key: jax.Array | None = None, *, noise: jax.Array | None = None) -> jax.Array:
        """mean + std * eps, with eps drawn from `key` or given as `noise` (to replay a reference draw)."""
        if (key is None) == (noise is None):
            raise ValueError("DiagonalGaussian.sample needs exactly one of key= or noise=")
        if noise is None:
            noise = jax.random.normal(key, self.mean.shape, self.mean.dtype)
        elif noise.shape != self.mean.shape:
            raise ValueError(f"noise has shape {noise.shape}, the posterior mean {self.mean.shape}")
        return self.mean + self.std * noise


def to_channels_last(x: jax.Array) -> jax.Array:
    return jnp.moveaxis(x, 1, -1)


def to_channels_first(x: jax.Array) -> jax.Array:
    return jnp.moveaxis(x, -1, 1)


class AutoencoderKLWan(nnx.Module):
    """The Wan2.1 VAE. Build with a config from `helios_jax.models.vae_config`, or load weights
    with `helios_jax.load(vae_folder)`."""

    def __init__(self, config: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
        validate(config)
        config = ml_collections.FrozenConfigDict(config)  # hashable: the module is usable under nnx.jit
        self.config = config
        dtype = jnp.dtype(config.dtype)
        self.dtype = dtype
        kw = dict(dtype=dtype, rngs=rngs)
        self.encoder = Encoder(config, **kw)
        self.quant_conv = Conv3d(2 * config.z_dim, 2 * config.z_dim, (1, 1, 1), **kw)
        self.post_quant_conv = Conv3d(config.z_dim, config.z_dim, (1, 1, 1), **kw)
        self.decoder = Decoder(config, **kw)

    # Public API, diffusers layouts. Each call is jitted (one compile per input shape).

    def encode(self, x: jax.Array) -> jax.Array:
        """Video [B, 3, T, H, W] in [-1, 1] -> posterior mean [B, z, T', H/8, W/8] (T' = 1 + (T-1)//4)."""
        return self.encode_posterior(x).mean

    def encode_posterior(self, x: jax.Array) -> DiagonalGaussian:
        """Video [B, 3, T, H, W] -> the posterior (mean and clamped logvar, [B, z, T', h, w])."""
        self._check_video(x, self.config.in_channels, "x")
        return _encode_jit(self, x)

    def decode(self, z: jax.Array) -> jax.Array:
        """Latents [B, z, T, h, w] (denormalised) -> frames [B, 3, 1 + 4(T-1), 8h, 8w] in [-1, 1]."""
        self._check_video(z, self.config.z_dim, "z")
        return _decode_jit(self, z, None)[0]

    def decode_start(self, z: jax.Array) -> tuple[jax.Array, dict]:
        """Decode the first latents of a segment; returns the frames and the cache for `decode_continue`."""
        self._check_video(z, self.config.z_dim, "z")
        return _decode_jit(self, z, None)

    def decode_continue(self, z: jax.Array, cache: dict) -> tuple[jax.Array, dict]:
        """Decode the next latents of the segment that produced `cache` (4 frames per latent)."""
        self._check_video(z, self.config.z_dim, "z")
        return _decode_jit(self, z, cache)

    def normalize_latents(self, z: jax.Array, *, channel_axis: int = 1) -> jax.Array:
        """(z - mean) * (1 / std) with the checkpoint's latents_mean / latents_std, in fp32 (spec A.8)."""
        mean, inv_std = self._latent_stats(z.ndim, channel_axis)
        return (z.astype(jnp.float32) - mean) * inv_std

    def denormalize_latents(self, z: jax.Array, *, channel_axis: int = 1) -> jax.Array:
        """z_n / (1 / std) + mean: the reference divides by the fp32 reciprocal, which rounds differently."""
        mean, inv_std = self._latent_stats(z.ndim, channel_axis)
        # XLA turns x / broadcast(c) into x * broadcast(1 / c), one ulp off in places; the barrier
        # keeps the true division the reference does.
        divisor = jax.lax.optimization_barrier(jnp.broadcast_to(inv_std, z.shape))
        return z.astype(jnp.float32) / divisor + mean

    # Traceable channels-last paths, for callers that are already inside a jitted program.

    def encode_moments(self, x: jax.Array) -> jax.Array:
        """[B, T, H, W, 3] -> [B, T', h, w, 2z] (mean | logvar before clamping), diffusers' chunk loop."""
        groups = (x.shape[1] - 1) // ENCODE_GROUP
        first, cache = self.encoder(x[:, :1], None)
        pieces = [first]
        if groups:
            rest = x[:, 1 : 1 + groups * ENCODE_GROUP]
            rest = rest.reshape(x.shape[0], groups, ENCODE_GROUP, *x.shape[2:]).swapaxes(0, 1)
            pieces.append(self._scan(self.encoder, cache, rest)[1])
        return self.quant_conv(jnp.concatenate(pieces, axis=1))

    def decode_frames(self, z: jax.Array, cache: dict | None = None) -> tuple[jax.Array, dict]:
        """[B, T, h, w, z] -> ([B, frames, H, W, 3] clamped to [-1, 1], cache). cache=None starts a segment."""
        x = self.post_quant_conv(z)
        pieces = []
        if cache is None:
            first, cache = self.decoder(x[:, :1], None)
            pieces.append(first)
            x = x[:, 1:]
        if x.shape[1]:
            cache, rest = self._scan(self.decoder, cache, x.swapaxes(0, 1)[:, :, None])
            pieces.append(rest)
        return jnp.clip(jnp.concatenate(pieces, axis=1), -1.0, 1.0), cache

    @staticmethod
    def _scan(step, cache, pieces):
        """Run `step` over pieces [N, B, t, ...] carrying the cache; outputs joined along time."""

        def body(carry, piece):
            out, carry = step(piece, carry)
            return carry, out

        cache, outs = jax.lax.scan(body, cache, pieces)
        n, b, t = outs.shape[:3]
        return cache, outs.swapaxes(0, 1).reshape(b, n * t, *outs.shape[3:])

    def _latent_stats(self, ndim: int, channel_axis: int):
        # diffusers does not check these lengths at load time; a mismatch only shows here.
        if not len(self.config.latents_mean) == len(self.config.latents_std) == self.config.z_dim:
            raise ValueError(f"VAE config: latents_mean and latents_std need z_dim={self.config.z_dim} values each")
        shape = [1] * ndim
        shape[channel_axis] = self.config.z_dim
        mean = jnp.asarray(self.config.latents_mean, jnp.float32).reshape(shape)
        inv_std = (1.0 / jnp.asarray(self.config.latents_std, jnp.float32)).reshape(shape)
        return mean, inv_std

    @staticmethod
    def _check_video(x, channels: int, name: str) -> None:
        if x.ndim != 5 or x.shape[1] != channels or x.shape[2] < 1:
            raise ValueError(f"{name} must be [B, {channels}, T>=1, H, W] (channels first); got shape {tuple(x.shape)}")


# The public calls, jitted whole (layout changes included) so a call is one compiled program.


@nnx.jit
def _encode_jit(vae: AutoencoderKLWan, x):
    moments = to_channels_first(vae.encode_moments(to_channels_last(x)))
    mean, logvar = jnp.split(moments, 2, axis=1)
    return DiagonalGaussian(mean=mean, logvar=jnp.clip(logvar, -30.0, 20.0))


@nnx.jit
def _decode_jit(vae: AutoencoderKLWan, z, cache):
    frames, cache = vae.decode_frames(to_channels_last(z), cache)
    return to_channels_first(frames), cache
