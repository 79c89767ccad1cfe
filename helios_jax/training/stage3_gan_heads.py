"""The Stage-3 GAN discriminator heads and losses (spec training.md §6.3).

Five `Discriminator3DHead`s read the critic's features (after blocks 5, 15, 25, 35, current-chunk
tokens as [B, T, H/2, W/2, dim]) and its final 16-channel flow output; each is a stack of
Conv3d -> GroupNorm(32) -> SiLU layers, a global average pool and a linear logit. Inputs are
channels-last [B, T, H, W, C]. Weights start as PyTorch's default init (uniform +-1/sqrt(fan_in)).
Sign convention of the reference: a low logit means "real"; loss(logit, label) = mean softplus(label * logit).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

HOOK_BLOCKS = (5, 15, 25, 35)
# (kernel, stride, padding) of each conv, as the reference stacks them.
_LAYERS = (
    ((3, 3, 3), (1, 1, 1), (1, 1, 1)),
    ((4, 4, 4), (2, 2, 2), (1, 1, 1)),
    ((4, 4, 4), (2, 2, 2), (1, 1, 1)),
    ((3, 3, 3), (2, 1, 1), (1, 1, 1)),
    ((3, 3, 3), (2, 1, 1), (1, 1, 1)),
    ((1, 3, 3), (1, 1, 1), (0, 1, 1)),
)


# Logical axes of a conv kernel [kT, kH, kW, in, out]: the output channels go over `fsdp` like the
# transformer's (988M parameters with two fp32 moments would be 12 GiB per chip replicated).
_CONV_AXES = {"out_sharding": (None, None, None, "conv_in", "conv_out"), "eager_sharding": False}


def _torch_default(fan_in: int):
    """U(-1/sqrt(fan_in), 1/sqrt(fan_in)); drawn with numpy outside a trace (eager jax.random
    compiles once per shape, seconds each on a CPU)."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        if isinstance(key, jax.core.Tracer):
            return jax.random.uniform(key, shape, dtype, -bound, bound)
        rng = np.random.default_rng(np.asarray(jax.random.key_data(key)))
        return jnp.asarray(rng.uniform(-bound, bound, shape), dtype)

    return init


class Discriminator3DHead(nnx.Module):
    def __init__(self, in_channels: int, cond_map_dim: int = 768, *, groups: int = 32, rngs: nnx.Rngs):
        convs, norms = [], []
        channels = in_channels
        for kernel, stride, padding in _LAYERS:
            init = _torch_default(channels * math.prod(kernel))
            convs.append(nnx.Conv(channels, cond_map_dim, kernel, stride, padding=[(p, p) for p in padding],
                                  kernel_init=init, bias_init=init, kernel_metadata=_CONV_AXES, rngs=rngs))
            norms.append(nnx.GroupNorm(cond_map_dim, num_groups=groups, epsilon=1e-5, rngs=rngs))
            channels = cond_map_dim
        self.convs, self.norms = nnx.List(convs), nnx.List(norms)
        init = _torch_default(cond_map_dim)
        self.logit = nnx.Linear(cond_map_dim, 1, kernel_init=init, bias_init=init, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [B, T, H, W, C] -> logits [B, 1] (fp32)."""
        x = x.astype(jnp.float32)
        for conv, norm in zip(self.convs, self.norms):
            x = jax.nn.silu(norm(conv(x)))
        return self.logit(jnp.mean(x, axis=(1, 2, 3)))


class GanHeads(nnx.Module):
    """One head per hooked block (on `dim`-channel features) plus one on the 16-channel output."""

    def __init__(self, dim: int, out_channels: int = 16, cond_map_dim: int = 768, *, hooks=HOOK_BLOCKS, rngs: nnx.Rngs):
        self.hooks = tuple(hooks)
        self.final = Discriminator3DHead(out_channels, cond_map_dim, rngs=rngs)
        self.blocks = nnx.List([Discriminator3DHead(dim, cond_map_dim, rngs=rngs) for _ in self.hooks])

    def __call__(self, output: jax.Array, features: list[jax.Array]) -> jax.Array:
        """Logits [B, 1 + len(hooks)]: the output head first, then the block heads in hook order."""
        if len(features) != len(self.blocks):
            raise ValueError(f"GAN heads take {len(self.blocks)} feature maps (blocks {self.hooks}); got {len(features)}")
        return jnp.concatenate([self.final(output)] + [head(f) for head, f in zip(self.blocks, features)], axis=-1)


def softplus_loss(logits: jax.Array, label: float) -> jax.Array:
    return jnp.mean(jax.nn.softplus(label * logits.astype(jnp.float32)))


def discriminator_loss(fake_logits, real_logits, weight: float = 0.01) -> jax.Array:
    """weight * [softplus(-D(fake)) + softplus(D(real))]: pushes real logits down, fake up."""
    return weight * (softplus_loss(fake_logits, -1.0) + softplus_loss(real_logits, 1.0))


def generator_loss(fake_logits, weight: float = 0.05) -> jax.Array:
    """weight * softplus(D(fake)): the generator wants its samples to score as real (low)."""
    return weight * softplus_loss(fake_logits, 1.0)


def approximate_r1(real_logits, perturbed_logits, weight: float = 100.0) -> jax.Array:
    """Finite-difference R1: weight * mean((D(real) - D(real + 0.1 n))^2)."""
    return weight * jnp.mean((real_logits.astype(jnp.float32) - perturbed_logits.astype(jnp.float32)) ** 2)


def random_crop(key, x: jax.Array, height: int, width: int) -> jax.Array:
    """An independent random (height, width) crop of each sample of channels-last x [B, T, H, W, C]."""
    batch, _, full_h, full_w, _ = x.shape
    ky, kx = jax.random.split(key)
    ys = jax.random.randint(ky, (batch,), 0, full_h - height + 1)
    xs = jax.random.randint(kx, (batch,), 0, full_w - width + 1)
    crop = lambda sample, y, x0: jax.lax.dynamic_slice(  # noqa: E731
        sample, (0, y, x0, 0), (sample.shape[0], height, width, sample.shape[-1]))
    return jax.vmap(crop)(x, ys, xs)
