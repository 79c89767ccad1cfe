"""Sequence-parallel self-attention: the token axis is split over the mesh axis `seq`.

Two strategies, both exact (same math as `dot_product_attention`, up to fp32 rounding):

* Ulysses (heads divisible by the axis size): an all-to-all trades each device's sequence block
  for a block of heads, every device runs ordinary full-sequence attention on H/n heads through
  `dot_product_attention` (so cuDNN / future Pallas kernels apply), and a second all-to-all
  trades back. Communication: 4 all-to-alls of q/k/v/out, independent of n.
* Ring (fallback when heads do not divide): queries stay put, key/value blocks travel around
  the ring with `ppermute`; each step folds one block into an online softmax kept in fp32.

Token counts that do not divide the axis are zero-padded at the end; the padded keys are
ignored (sliced off for Ulysses, masked for the ring) and the padded queries dropped. Batch
sharding over `data`/`fsdp` and head sharding over `tensor` pass through the shard_map
untouched (each is used only when it divides the dimension).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from helios_jax.kernels.dispatch import dot_product_attention
from helios_jax.parallel import active_mesh

BATCH_AXES = ("data", "fsdp")
HEADS_AXIS = "tensor"
STRATEGIES = ("auto", "ulysses", "ring")
MASKED_LOGIT = -1e30  # padded keys in the ring


def self_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, impl: str = "auto", axis: str = "seq"):
    """What the transformer calls for self-attention: sequence-parallel when the active mesh
    (`helios_jax.parallel.active_mesh()`) has `axis` larger than 1, plain attention otherwise."""
    mesh = active_mesh()
    if mesh is None or _axis_size(mesh, axis) <= 1:
        return dot_product_attention(q, k, v, impl=impl)
    return sequence_parallel_attention(q, k, v, mesh=mesh, axis=axis, impl=impl)


def sequence_parallel_attention(q, k, v, *, mesh, axis: str = "seq", impl: str = "auto",
                                strategy: str = "auto", interpret: bool = False):
    """Self-attention on [B, L, H, D] q/k/v with L split over the mesh axis `axis`.

    strategy: "ulysses" (needs local heads divisible by the axis size), "ring", or "auto"
    (Ulysses when heads divide, the ring otherwise). `impl`/`interpret` go to the local
    attention of Ulysses; the ring computes its blocks itself.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"sequence-parallel strategy must be one of {', '.join(STRATEGIES)}; got {strategy!r}")
    if q.shape != k.shape or k.shape != v.shape:
        raise ValueError(f"self-attention needs q, k, v of one shape; got {q.shape}, {k.shape}, {v.shape}")
    n = _axis_size(mesh, axis)
    if n <= 1:
        return dot_product_attention(q, k, v, impl=impl, interpret=interpret)
    batch, length, heads, _ = q.shape
    batch_axes = _dividing_axes(mesh, BATCH_AXES, batch)
    heads_axis = HEADS_AXIS if _axis_size(mesh, HEADS_AXIS) > 1 and heads % _axis_size(mesh, HEADS_AXIS) == 0 else None
    local_heads = heads // (_axis_size(mesh, heads_axis) if heads_axis else 1)
    if strategy == "auto":
        strategy = "ulysses" if local_heads % n == 0 else "ring"
    if strategy == "ulysses" and local_heads % n:
        raise ValueError(f"Ulysses needs the {local_heads} heads per device divisible by {axis}={n}; use the ring")

    # Pad the tokens to a multiple of n so every device holds one equal block.
    padded = math.ceil(length / n) * n
    if padded != length:
        pad = [(0, 0), (0, padded - length), (0, 0), (0, 0)]
        q, k, v = (jnp.pad(t, pad) for t in (q, k, v))

    spec = PartitionSpec(batch_axes or None, axis, heads_axis, None)
    if strategy == "ulysses":
        local = lambda q, k, v: _ulysses_local(q, k, v, axis=axis, length=length, impl=impl, interpret=interpret)
    else:
        local = lambda q, k, v: _ring_local(q, k, v, axis=axis, n=n, length=length)
    # The Pallas interpreter's grid loop drops the varying-axis types of its carries (jax 0.12), so
    # interpreted kernels need the vma check off; compiled kernels (Triton, Mosaic) keep it on.
    out = jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec,
                        check_vma=not interpret)(q, k, v)
    return out[:, :length] if padded != length else out


def _ulysses_local(q, k, v, *, axis: str, length: int, impl: str, interpret: bool):
    """Per device: [B, L/n, h, D] blocks -> full sequence on h/n heads -> back."""
    # tiled all_to_all: split heads into n chunks (chunk j goes to device j), concatenate the
    # received sequence blocks in device order, which is the global token order.
    to_heads = lambda t: jax.lax.all_to_all(t, axis, split_axis=2, concat_axis=1, tiled=True)
    q, k, v = (to_heads(t) for t in (q, k, v))
    padded = q.shape[1]
    if padded != length:
        # The padding sits at the end of the gathered sequence: drop the padded keys; padded
        # queries are dropped after the call, padded again so the blocks stay equal.
        out = dot_product_attention(q[:, :length], k[:, :length], v[:, :length], impl=impl, interpret=interpret)
        out = jnp.pad(out, [(0, 0), (0, padded - length), (0, 0), (0, 0)])
    else:
        out = dot_product_attention(q, k, v, impl=impl, interpret=interpret)
    return jax.lax.all_to_all(out, axis, split_axis=1, concat_axis=2, tiled=True)


def _ring_local(q, k, v, *, axis: str, n: int, length: int):
    """Per device: this query block against every key/value block as they pass around the ring."""
    block = q.shape[1]
    index = jax.lax.axis_index(axis)
    scale = 1.0 / math.sqrt(q.shape[-1])
    qf = q.astype(jnp.float32) * scale
    running_max = running_sum = accumulator = None
    forward = [(i, (i + 1) % n) for i in range(n)]
    for step in range(n):  # n is a small static mesh size: unrolled, differentiable
        source = (index - step) % n  # the device this k/v block started on
        logits = jnp.einsum("bqhd,bkhd->bhqk", qf, k.astype(jnp.float32))
        if n * block != length:  # mask keys past the true token count (end padding)
            positions = source * block + jnp.arange(block)
            # A finite floor, not -inf: a fully padded block then gives exp(...) = 0, never NaN.
            logits = jnp.where((positions < length)[None, None, None], logits, MASKED_LOGIT)
        block_max = logits.max(axis=-1)
        new_max = block_max if running_max is None else jnp.maximum(running_max, block_max)
        probs = jnp.exp(logits - new_max[..., None])
        block_sum = probs.sum(axis=-1)
        block_out = jnp.einsum("bhqk,bkhd->bhqd", probs, v.astype(jnp.float32))
        if running_max is None:
            running_sum, accumulator = block_sum, block_out
        else:
            correction = jnp.exp(running_max - new_max)
            running_sum = running_sum * correction + block_sum
            accumulator = accumulator * correction[..., None] + block_out
        running_max = new_max
        if step < n - 1:
            k, v = (jax.lax.ppermute(t, axis, forward) for t in (k, v))
    out = accumulator / running_sum[..., None]
    return jnp.transpose(out, (0, 2, 1, 3)).astype(q.dtype)


def _axis_size(mesh, name) -> int:
    return dict(mesh.shape).get(name, 1) if name else 1


def _dividing_axes(mesh, names, size: int) -> tuple[str, ...]:
    """The mesh axes among `names` (larger than 1) whose running product divides `size`."""
    chosen, product = [], 1
    for name in names:
        width = _axis_size(mesh, name)
        if width > 1 and size % (product * width) == 0:
            chosen.append(name)
            product *= width
    return tuple(chosen)
