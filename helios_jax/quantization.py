"""Weight-only int8 quantization of the Helios transformer and the UMT5 text encoder, through qwix.

`quantize(model, "int8")` replaces, in place, every large matmul weight with a qwix `QArray`: int8
values plus one fp32 scale per output channel (per layer for the stacked blocks), quantized by
qwix's absmax calibration. In the forward the layer multiplies by the int8 values converted to the
compute dtype (exact: int8 fits bf16's mantissa) with fp32 accumulation and applies the
per-output-channel scale to that fp32 sum, x @ (q * s) == (x @ q) * s; activations stay bf16/fp32.
The convert fuses into the matmul, so no dequantized copy of a weight exists even inside the block
scan and the step loop (with `qwix.dequantize` first, the int8 14B chunk program needed 16.0 GiB of
HBM on a v5e chip and did not fit).

Why not `qwix.quantize_model(model, qwix.PtqProvider(rules), *inputs)`: it quantizes each weight
the first time the layer's einsum runs, in a full-precision forward. In our scanned block stack
that is a one-layer slice inside `lax.scan`, still tagged with the stacked parameter's axes (qwix
0.1.8 with flax 0.12.12 stops there with an AssertionError), and the int8 value would land on the
per-iteration module, never on the stacked parameter. Quantizing the stacked arrays directly with
qwix's qarray functions keeps the scan, `nnx.split` and the chunk program as they are.

What is quantized (docs/quantization.md): transformer attention q/k/v/out of both attentions, both
FFN linears, the text projection and time_proj; encoder q/k/v/o, wi_0/wi_1/wo and the token table
(per row, dequantized after the gather). What stays as it is: norms, biases, modulation tables,
the relative-position tables, patch embeddings, the fp32 time embedder (an fp32 island of the
reference) and proj_out (small, and its error would reach the velocity unfiltered).
"""
from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import qwix
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from helios_jax import parallel
from helios_jax.models.layers import Dense, add_adapter
from helios_jax.models.text_encoder import Linear, TokenEmbedding, UMT5EncoderModel
from helios_jax.models.transformer import HeliosTransformer3DModel

MODES = ("int8",)

# Module paths (dot-joined, matched whole) of the layers each model gets quantized.
TRANSFORMER_LAYERS = (
    r"blocks\.attn[12]\.to_(q|k|v|out)",
    r"blocks\.ffn\.linear_(in|out)",
    r"condition_embedder\.text_embedder\.linear_[12]",
    r"condition_embedder\.time_proj",
)
TEXT_ENCODER_LAYERS = (
    r"blocks\.attention\.[qkvo]",
    r"blocks\.feed_forward\.(wi_0|wi_1|wo)",
    r"token_embedding",
)
QUANTIZED_LAYERS = {HeliosTransformer3DModel: TRANSFORMER_LAYERS, UMT5EncoderModel: TEXT_ENCODER_LAYERS}


class QuantizedDense(nnx.Module):
    """Dense (or the encoder's bias-free Linear) with its kernel as int8 + per-output-channel scales.

    Called like the layer it replaces: y = (x @ int8 values) * scales (+ bias), fp32 accumulation,
    output in the layer's dtype; a LoRA adapter the layer had is kept and still applies.
    """

    def __init__(self, kernel: qwix.QArray, bias: nnx.Param | None, dtype, lora=None):
        self.dtype = dtype
        self.kernel = kernel
        self.bias = bias
        if lora is not None:
            self.lora = lora

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(self.dtype)
        kernel = _values(self.kernel)
        # The scale is per output channel, so it is applied to the fp32 sum instead of the weight:
        # x @ (q * s) == (x @ q) * s. The int8 -> bf16 convert (exact) then fuses into the matmul's
        # operand and no dequantized copy of the weight (fp32 or bf16) exists, which is what lets the
        # int8 14B chunk program fit one 16 GiB chip.
        y = jnp.einsum("...i,io->...o", x, kernel.qvalue.astype(self.dtype), preferred_element_type=jnp.float32)
        y = y * _output_scale(kernel.scale)
        if self.bias is not None:
            y = y + self.bias[...].astype(jnp.float32)
        return add_adapter(self, y, "...i,ir->...r", x).astype(self.dtype)


class QuantizedEmbedding(nnx.Module):
    """The token table as int8 + one scale per row: only the gathered rows are dequantized."""

    def __init__(self, embedding: qwix.QArray, dtype):
        self.dtype = dtype
        self.embedding = embedding

    def __call__(self, input_ids: jax.Array) -> jax.Array:
        table = _values(self.embedding)
        rows = jax.tree.map(lambda a: jnp.take(a, input_ids, axis=0), table)
        return qwix.dequantize(rows).astype(self.dtype)


def quantize(module: nnx.Module, mode: str = "int8") -> nnx.Module:
    """Weight-only quantization of a HeliosTransformer3DModel or UMT5EncoderModel, in place
    (returns `module`, usable exactly as before: nnx.split, the chunk program, the same call).

    Layer by layer and array by array: each weight's full-precision array is dropped as soon as its
    int8 form exists, and a stacked array is quantized one layer at a time, so the extra memory is
    one array's int8 copy plus one layer's fp32 temporaries. Quantize before building a pipeline or
    a TextEncoder: they `nnx.split` the module when constructed. Works under nnx.eval_shape and on
    an abstract module (see `abstract_quantized`). An already quantized module is left as it is.
    """
    patterns = _layer_patterns(module, mode)
    for path in _matching_paths(module, patterns):
        parent = _submodule(module, path[:-1])
        setattr(parent, path[-1], _quantized_layer(getattr(parent, path[-1])))
    return module


def quantized_builder(build_fn, mode: str = "int8"):
    """`build_fn` (a module constructor call) followed by `quantize`: what parallel.abstract_sharded
    and parallel.init_sharded take, e.g. `abstract_sharded(quantized_builder(build), mesh)` for an
    ahead-of-time compile of the int8 14B with nothing allocated."""
    _check_mode(mode)
    return lambda: quantize(build_fn(), mode)


def abstract_quantized(build_fn, mode: str = "int8") -> nnx.Module:
    """The quantized module of `build_fn()` with ShapeDtypeStruct leaves (int8 values, fp32 scales,
    logical axes kept): nothing is allocated."""
    return nnx.eval_shape(quantized_builder(build_fn, mode))


def parameter_bytes(module: nnx.Module) -> int:
    """Bytes of every variable of `module` (real or abstract)."""
    return sum(v.get_value().size * v.get_value().dtype.itemsize for _, v in nnx.to_flat_state(nnx.state(module)))


# ------------------------------------------------------------------------------------------------


def _check_mode(mode) -> None:
    if mode not in MODES:
        raise ValueError(f"quantization mode must be one of {', '.join(MODES)}; got {mode!r}")


def _layer_patterns(module, mode) -> tuple[str, ...]:
    _check_mode(mode)
    for model_class, patterns in QUANTIZED_LAYERS.items():
        if isinstance(module, model_class):
            return patterns
    raise ValueError(f"quantize: a {type(module).__name__} is neither a HeliosTransformer3DModel nor a "
                     "UMT5EncoderModel (for a TextEncoder, quantize its encoder before wrapping it)")


def _matching_paths(module, patterns) -> list[tuple]:
    """Paths of the not yet quantized layers matching `patterns`. Only paths are kept: holding the
    layers themselves would keep every full-precision array alive until the end."""
    compiled = [re.compile(p) for p in patterns]
    paths = []
    for path, layer in nnx.iter_modules(module):
        name = ".".join(map(str, path))
        if isinstance(layer, (Dense, Linear, TokenEmbedding)) and any(p.fullmatch(name) for p in compiled):
            paths.append(tuple(path))
    return paths


def _submodule(module, path):
    for name in path:
        module = getattr(module, name)
    return module


def _quantized_layer(layer):
    if isinstance(layer, TokenEmbedding):
        # One scale per vocabulary row: rows are read whole, and each token keeps its own range.
        return QuantizedEmbedding(_int8(layer.embedding, channel_axis=0), layer.embedding.get_value().dtype)
    # Kernels are [(layers,) in, out]: one scale per output channel (and layer), absmax over `in`.
    kernel = _int8(layer.kernel, channel_axis=-1)
    return QuantizedDense(kernel, getattr(layer, "bias", None), layer.dtype, getattr(layer, "lora", None))


def _int8(variable: nnx.Param, channel_axis: int) -> qwix.QArray:
    """A QArray of two Params: the int8 values, with the variable's logical axes (so shard_state and
    abstract_sharded place them as the original was), and fp32 scales [.., 1, ..]. The scales are
    replicated apart from the layers axis: tiny, and any split of them could differ from the values'
    split and make XLA move the values instead."""
    value = variable.get_value()
    if not jnp.issubdtype(value.dtype, jnp.floating):
        raise ValueError(f"quantize: a {value.dtype} weight cannot be quantized (expected floating point)")
    axes = tuple(variable.get_metadata().get("out_sharding") or (None,) * value.ndim)
    stacked = bool(axes) and axes[0] == "layers"
    quantize_array = functools.partial(_quantize_array, channel_axis=channel_axis % value.ndim - stacked,
                                       stacked=stacked)
    # An abstract module (nnx.eval_shape's) gets abstract int8 values and scales.
    abstract = isinstance(value, jax.ShapeDtypeStruct)
    qvalue, scale = jax.eval_shape(quantize_array, value) if abstract else quantize_array(value)
    scale_axes = ("layers",) * stacked + (None,) * (value.ndim - stacked)
    mesh = _mesh_of(value)
    if mesh is not None:  # a sharded model stays sharded by the rules
        qvalue = jax.device_put(qvalue, parallel.sharding_for(qvalue.shape, axes, mesh))
        scale = jax.device_put(scale, parallel.sharding_for(scale.shape, scale_axes, mesh))
    return qwix.QArray(
        qvalue=nnx.Param(qvalue, out_sharding=axes, eager_sharding=False),
        scale=nnx.Param(scale, out_sharding=scale_axes, eager_sharding=False),
        qtype=jnp.int8,
    )


def _mesh_of(value) -> Mesh | None:
    """The multi-device mesh a concrete array is placed on, else None (one device, or traced)."""
    sharding = getattr(value, "sharding", None) if not isinstance(value, jax.core.Tracer) else None
    return sharding.mesh if isinstance(sharding, NamedSharding) and sharding.mesh.size > 1 else None


@functools.partial(jax.jit, static_argnames=("channel_axis", "stacked"))
def _quantize_array(value: jax.Array, *, channel_axis: int, stacked: bool):
    """(int8 values, fp32 scales) with one scale per index of `channel_axis` of each matrix; a stacked
    array goes through lax.map, one layer's temporaries at a time."""

    def one_matrix(matrix):
        # In fp32: bf16 cannot hold value / scale to the nearest int8 step (its spacing is 0.5 above 64).
        q = qwix.quantize(matrix.astype(jnp.float32), jnp.int8, channelwise_axes=(channel_axis,))
        return q.qvalue, q.scale

    return jax.lax.map(one_matrix, value) if stacked else one_matrix(value)


def _output_scale(scale: jax.Array) -> jax.Array:
    """The [in=1, out] per-output-channel scale as an fp32 vector over the output channels."""
    if any(size != 1 for size in scale.shape[:-1]):
        raise ValueError(f"expected one scale per output channel, got scale shape {tuple(scale.shape)}")
    return scale.reshape(scale.shape[-1]).astype(jnp.float32)


def _values(qarray: qwix.QArray) -> qwix.QArray:
    """The QArray with its Params read: what qwix's arithmetic takes."""
    return jax.tree.map(lambda v: v[...], qarray, is_leaf=lambda v: isinstance(v, nnx.Variable))
