"""jax's own splash attention (`jax.experimental.pallas.ops.tpu.splash_attention`) behind the
layout and meaning of `dot_product_attention`: [B, L, H, D] q/k/v, no mask, scale 1/sqrt(D).

Splash is the Mosaic flash attention jax ships and tests on TPU hardware, with its own forward,
dq and dk/dv kernels under a `jax.custom_vjp`. It works per example on [H, L, D] arrays whose
lengths are multiples of its blocks and does not scale the logits, so this wrapper:

- scales q by 1/sqrt(D) (the gradient flows through that multiply);
- zero-pads q and k/v to their block multiples; when keys were padded, segment ids (real keys 0,
  padded keys 1, every query 0) give the padded keys the kernel's mask value, so their probability
  is exactly 0 and they get no gradient; padded queries are sliced off (zero cotangent);
- folds the batch into the heads (each (example, head) pair is an independent head to splash);
- under a mesh, runs it per device in a `shard_map` like `flash_tpu` (the TPU compiler cannot
  partition a Mosaic call): batch over data/fsdp, heads over tensor, queries over seq, each where
  it divides; k/v whole along their length. Inside a shard_map (Ulysses) it runs on the local
  shard as given; where that shard_map checks varying axes (compiled Ulysses), see
  `_without_vma_check`.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jax.sharding import PartitionSpec

from helios_jax.kernels import flash_tpu
from helios_jax.kernels.attention_inputs import check_qkv
from helios_jax.kernels.flash_tpu import LANES
from helios_jax.kernels.kernel_mesh import check_block_sizes, on_mesh_axes

# 512-token tiles (MaxText's splash default on v5p) for every kernel; clamped to the padded length.
DEFAULT_BLOCK = 512
REAL_KEY, PADDED_KEY = 0, 1  # segment ids: queries (all REAL_KEY) only see keys of their segment


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, block_q: int | None = None,
                     block_k: int | None = None, interpret: bool = False) -> jax.Array:
    """Attention over [B, L, H, D] q and [B, S, H, D] k/v (no mask, scale 1/sqrt(D), fp32 softmax)
    through jax's splash kernels. Differentiable in q, k and v; returns q.dtype.

    block_q / block_k: tile sizes along the query / key sequence for the forward and both
    backward kernels (multiples of 128; default 512, clamped to the length rounded up to 128).
    interpret: run the kernels in Pallas' TPU interpreter (CPU).
    """
    check_qkv(q, k, v, who="splash_attention")
    check_block_sizes("splash_attention", LANES, block_q=block_q, block_k=block_k)
    attention = functools.partial(_local_attention, block_q=block_q, block_k=block_k, interpret=interpret)
    out = on_mesh_axes(attention, q, k, v)
    if out is not None:
        return out
    if _varying_axes(q, k, v):
        return _without_vma_check(attention, jax.sharding.get_abstract_mesh(), interpret)(q, k, v)
    return attention(q, k, v)




def _varying_axes(*arrays) -> tuple[str, ...]:
    """The manual mesh axes the arrays vary over (inside a shard_map that checks them)."""
    return tuple(sorted(set().union(*(jax.typeof(a).manual_axis_type.varying for a in arrays))))


def _without_vma_check(attention, mesh, interpret: bool):
    """`attention` inside a shard_map that checks varying axes (Ulysses on a TPU), whose types
    splash's kernels do not declare: the forward runs in a nested shard_map that makes no axis
    manual, with the check off, and its result is marked varying like the inputs again.

    That marking (`pcast`) would transpose to a psum across devices, so the gradient is given
    explicitly: our flash kernels' (`flash_tpu`, which declare their types), the same math
    recomputed from q, k, v. Only training under such a shard_map takes it."""
    forward = jax.shard_map(attention, mesh=mesh, in_specs=PartitionSpec(), out_specs=PartitionSpec(),
                            axis_names=frozenset(), check_vma=False)
    flash = functools.partial(flash_tpu.flash_attention, interpret=interpret)

    @jax.custom_vjp
    def checked(q, k, v):
        return _vary_like(forward(q, k, v), q, k, v)

    def checked_forward(q, k, v):
        return checked(q, k, v), (q, k, v)

    def checked_backward(inputs, d_out):
        return jax.vjp(flash, *inputs)[1](d_out)

    checked.defvjp(checked_forward, checked_backward)
    return checked


def _vary_like(x: jax.Array, *likes: jax.Array) -> jax.Array:
    return jax.lax.pcast(x, _varying_axes(*likes), to="varying")


def _local_attention(q, k, v, *, block_q, block_k, interpret):
    """Splash on one device's [B, L, H, D] arrays."""
    batch, q_len, heads, head_dim = q.shape
    kv_len = k.shape[1]
    block_q = min(block_q or DEFAULT_BLOCK, _round_up(q_len, LANES))
    block_k = min(block_k or DEFAULT_BLOCK, _round_up(kv_len, LANES))
    q = q * jnp.asarray(1.0 / math.sqrt(head_dim), q.dtype)
    q = _pad_sequence(_heads_first(q), block_q)
    k, v = (_pad_sequence(_heads_first(t), block_k) for t in (k, v))
    kernel = _kernel(batch * heads, q.shape[1], k.shape[1], block_q, block_k, interpret)
    out = kernel(q, k, v, segment_ids=_segment_ids(q.shape[1], k.shape[1], kv_len))
    return jnp.swapaxes(out[:, :q_len].reshape(batch, heads, q_len, head_dim), 1, 2)


def _heads_first(t: jax.Array) -> jax.Array:
    """[B, L, H, D] -> [B * H, L, D]: splash takes [heads, L, D], and every (example, head) pair
    is an independent head to it (one kernel, no vmap over the batch)."""
    batch, length, heads, head_dim = t.shape
    return jnp.swapaxes(t, 1, 2).reshape(batch * heads, length, head_dim)


def _kernel(heads: int, q_len: int, kv_len: int, block_q: int, block_k: int, interpret: bool):
    """Splash for full attention on padded [heads, q_len, D] x [heads, kv_len, D]. Built where it
    is called: its block tables are arrays, constants of the program being traced."""
    mask = splash.MultiHeadMask([splash.FullMask((q_len, kv_len))] * heads)
    blocks = splash.BlockSizes(block_q=block_q, block_kv=block_k, block_kv_compute=block_k,
                               block_q_dkv=block_q, block_kv_dkv=block_k, block_kv_dkv_compute=block_k,
                               block_q_dq=block_q, block_kv_dq=block_k)
    return splash.make_splash_mha(mask, block_sizes=blocks, head_shards=1, q_seq_shards=1,
                                  interpret=pltpu.InterpretParams() if interpret else False)


def _segment_ids(q_len: int, padded_kv_len: int, kv_len: int) -> splash.SegmentIds | None:
    """Segment ids that hide the padded keys from every query; None when no key was padded."""
    if padded_kv_len == kv_len:
        return None
    kv = np.where(np.arange(padded_kv_len) < kv_len, REAL_KEY, PADDED_KEY).astype(np.int32)
    return splash.SegmentIds(q=jnp.full((q_len,), REAL_KEY, jnp.int32), kv=jnp.asarray(kv))


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _pad_sequence(t: jax.Array, block: int) -> jax.Array:
    """[heads, L, D] zero-padded along L to a multiple of `block`."""
    extra = _round_up(t.shape[1], block) - t.shape[1]
    return jnp.pad(t, [(0, 0), (0, extra), (0, 0)]) if extra else t
