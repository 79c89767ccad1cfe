"""Small building blocks shared by the models: parameters with logical axes, Dense, norms, patch embed.

Dtype rules follow the reference (spec §7.1): statistics of every norm in fp32, matmuls in the
parameter dtype with fp32 accumulation, elementwise activations in fp32 before rounding.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from helios_jax.kernels.norm_rope_math import rms_norm

Axes = tuple[str | None, ...]


def param(rngs: nnx.Rngs | None, init, shape: Sequence[int], dtype, axes: Axes) -> nnx.Param:
    """A parameter tagged with its logical axis names (one per dimension).

    `init(key, shape, dtype)` gets a jax key when traced (eval_shape, jit, vmap) and a numpy
    Generator seeded from the key otherwise: eager jax.random compiles a kernel per shape (about
    half a second each on a CPU), which made building a model with many shapes take minutes.
    """
    if len(axes) != len(shape):
        raise ValueError(f"logical axes {axes} do not match parameter shape {tuple(shape)}")
    key = rngs.params() if rngs is not None else jax.random.key(0)
    if not isinstance(key, jax.core.Tracer):
        key = np.random.default_rng(np.asarray(jax.random.key_data(key)))
    # Sharding is applied when a mesh is given (helios_jax.parallel), not at creation.
    return nnx.Param(jnp.asarray(init(key, tuple(shape), dtype)), out_sharding=axes, eager_sharding=False)


def stacked_layers(make_layer, num_layers: int, rngs: nnx.Rngs):
    """`num_layers` modules from `make_layer(rngs)` as one module whose parameters have a leading
    `layers` axis, so the model runs them with one `lax.scan` (compile time flat in depth)."""

    @nnx.split_rngs(splits=num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make(rngs):
        return make_layer(rngs)

    return make(rngs)


def _uniform(key, shape, low: float, high: float):
    if isinstance(key, np.random.Generator):
        return key.uniform(low, high, shape).astype(np.float32)
    return jax.random.uniform(key, shape, jnp.float32, low, high)


def _standard_normal(key, shape):
    if isinstance(key, np.random.Generator):
        return key.standard_normal(shape, dtype=np.float32)
    return jax.random.normal(key, shape, jnp.float32)


def xavier_uniform(key, shape, dtype):
    # Treat every leading dimension as fan-in, as torch does for a [out, in] Linear weight.
    fan_in, fan_out = math.prod(shape[:-1]), shape[-1]
    limit = (6.0 / (fan_in + fan_out)) ** 0.5
    return _uniform(key, shape, -limit, limit).astype(dtype)


def zeros(key, shape, dtype):
    del key
    return np.zeros(shape, dtype)


def ones(key, shape, dtype):
    del key
    return np.ones(shape, dtype)


def normal(stddev: float):
    def init(key, shape, dtype):
        return (stddev * _standard_normal(key, shape)).astype(dtype)

    return init


# Whether adapters apply. Read while tracing: a forward traced inside `adapters_disabled()` is the
# base model, so one backbone serves as the frozen teacher and, with its LoRA, as the critic.
_ADAPTERS_ENABLED = contextvars.ContextVar("helios_adapters_enabled", default=True)


@contextlib.contextmanager
def adapters_disabled():
    """Run (trace) forwards without any LoRA adapter: PEFT's `disable_adapter()`."""
    token = _ADAPTERS_ENABLED.set(False)
    try:
        yield
    finally:
        _ADAPTERS_ENABLED.reset(token)


def add_adapter(layer: nnx.Module, y: jax.Array, equation: str, x: jax.Array) -> jax.Array:
    """y plus the low-rank update of an adapter attached as `layer.lora` (helios_jax.training.lora),
    if any and adapters are enabled. `equation` contracts the layer's input with the adapter's down
    projection the way the layer contracts it with its kernel, so one adapter class serves Dense and
    PatchEmbed."""
    adapter = getattr(layer, "lora", None)
    if adapter is None or not _ADAPTERS_ENABLED.get():
        return y
    return y + adapter(equation, x, layer.dtype)


class Dense(nnx.Module):
    """y = x @ kernel + bias, kernel stored [in, out] (a torch Linear weight transposed)."""

    def __init__(self, in_features: int, out_features: int, *, axes: tuple[str, str], dtype, rngs):
        self.dtype = dtype
        self.kernel = param(rngs, xavier_uniform, (in_features, out_features), dtype, axes)
        self.bias = param(rngs, zeros, (out_features,), dtype, (axes[1],))

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(self.dtype)
        y = jnp.einsum("...i,io->...o", x, self.kernel[...], preferred_element_type=jnp.float32)
        y = y + self.bias[...].astype(jnp.float32)
        return add_adapter(self, y, "...i,ir->...r", x).astype(self.dtype)


def layer_norm(x: jax.Array, eps: float) -> jax.Array:
    """LayerNorm without affine parameters, in fp32 (FP32LayerNorm); returns fp32."""
    x = x.astype(jnp.float32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps)


class AffineLayerNorm(nnx.Module):
    """FP32 LayerNorm with fp32 weight and bias (the reference's `norm2`); returns fp32."""

    def __init__(self, dim: int, eps: float, *, rngs):
        self.eps = eps
        self.scale = param(rngs, ones, (dim,), jnp.float32, ("embed",))
        self.bias = param(rngs, zeros, (dim,), jnp.float32, ("embed",))

    def __call__(self, x: jax.Array) -> jax.Array:
        return layer_norm(x, self.eps) * self.scale[...] + self.bias[...]


class RMSNorm(nnx.Module):
    """RMSNorm with fp32 statistics: the normalised value is rounded to the input dtype, then
    multiplied by the weight (torch.nn.RMSNorm / the reference's fused kernel)."""

    def __init__(self, dim: int, eps: float, *, dtype, axis_name: str = "embed", rngs):
        self.eps = eps
        self.scale = param(rngs, ones, (dim,), dtype, (axis_name,))

    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_norm(x, self.scale[...], self.eps)


def gelu_tanh(x: jax.Array) -> jax.Array:
    return jax.nn.gelu(x.astype(jnp.float32), approximate=True).astype(x.dtype)


def silu(x: jax.Array) -> jax.Array:
    return jax.nn.silu(x.astype(jnp.float32)).astype(x.dtype)


def pad_end_to_multiple(x: jax.Array, multiples: Sequence[int], axes: Sequence[int]) -> jax.Array:
    """Replicate-pad the end of each axis in `axes` up to a multiple (torch `pad(..., 'replicate')`)."""
    pad = [(0, 0)] * x.ndim
    for axis, m in zip(axes, multiples):
        pad[axis] = (0, -x.shape[axis] % m)
    if all(p == (0, 0) for p in pad):
        return x
    return jnp.pad(x, pad, mode="edge")


class PatchEmbed(nnx.Module):
    """A Conv3d whose kernel equals its stride, done as a matmul over non-overlapping patches.

    Input and output are channels last: [B, T, H, W, C] -> [B, T', H', W', D]. The kernel is stored
    as Flax's conv layout [kT, kH, kW, C, D]. With `pad_to_multiple`, the end of T, H and W is
    replicate-padded first (the history terms); otherwise a remainder is dropped, as a VALID conv does.
    """

    def __init__(self, in_channels, out_channels, kernel_size, *, pad_to_multiple: bool, dtype, rngs):
        self.kernel_size = tuple(kernel_size)
        self.pad_to_multiple = pad_to_multiple
        self.dtype = dtype
        shape = (*self.kernel_size, in_channels, out_channels)
        self.kernel = param(rngs, xavier_uniform, shape, dtype, (None, None, None, None, "embed"))
        self.bias = param(rngs, zeros, (out_channels,), dtype, ("embed",))

    def __call__(self, x: jax.Array) -> jax.Array:
        kt, kh, kw = self.kernel_size
        if self.pad_to_multiple:
            x = pad_end_to_multiple(x, self.kernel_size, axes=(1, 2, 3))
        b, t, h, w, c = x.shape
        t, h, w = t // kt, h // kh, w // kw
        x = x[:, : t * kt, : h * kh, : w * kw].astype(self.dtype)
        x = x.reshape(b, t, kt, h, kh, w, kw, c)
        y = jnp.einsum("bTtHhWwc,thwcd->bTHWd", x, self.kernel[...], preferred_element_type=jnp.float32)
        y = y + self.bias[...].astype(jnp.float32)
        return add_adapter(self, y, "bTtHhWwc,thwcr->bTHWr", x).astype(self.dtype)
