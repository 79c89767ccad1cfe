"""Flash attention for TPU as Pallas (Mosaic) kernels, differentiable through `jax.custom_vjp`.

Forward: one grid step per (batch, head, query block, key block); the key-block axis is the
sequential ("arbitrary") one, folding each block into an online softmax whose running max, sum
and output accumulator stay in fp32 VMEM scratch. It also writes the logsumexp of every query
row, so the backward recomputes the probabilities instead of storing them (FlashAttention-2):
one kernel accumulates dq over key blocks, another dk/dv over query blocks, both using
D_i = rowsum(dO * O).

Lengths need not divide the blocks: q/k/v are zero-padded to the block multiple, padded keys get
a large negative logit before the max (probability exactly 0, so they receive zero gradient) and
padded queries are sliced off (their output cotangent is zero, so they add nothing to dk/dv).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from helios_jax.kernels.attention_inputs import check_qkv
from helios_jax.kernels.kernel_mesh import check_block_sizes, on_mesh_axes

DEFAULT_BLOCK = 512  # 512 x 512 fp32 logits are 1 MiB: several such tiles fit VMEM on v4/v5e/v5p/v6e
LANES = 128  # TPU vector lane width: blocks are multiples of it (also of 8/16 sublanes for fp32/bf16)
MASKED_LOGIT = -1e30  # finite: exp(MASKED_LOGIT - max) is 0, never NaN from inf - inf
# Mesh axes (helios_jax.parallel.AXES) the kernels are split over when called under a mesh.
_CONTRACT_LAST = (((1,), (1,)), ((), ()))  # a @ b.T without materialising b.T


def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, block_q: int | None = None,
                    block_k: int | None = None, interpret: bool = False) -> jax.Array:
    """Attention over [B, L, H, D] q and [B, S, H, D] k/v (no mask, scale 1/sqrt(D), fp32 softmax).

    block_q / block_k: tile sizes along the query / key sequence (multiples of 128; default 512,
    clamped to the padded length). interpret: run the kernels in Pallas' TPU interpreter (CPU).
    Differentiable in q, k and v; returns q.dtype.

    Under a mesh (`jax.set_mesh`) whose axes are not already manual, the kernels run per device in
    a `shard_map` (the compiler cannot partition a Mosaic call): batch over data/fsdp, heads over
    tensor, queries over seq, each where it divides; k/v whole along their length. Inside a
    shard_map (Ulysses) they run on the local shard as given.
    """
    _check_inputs(q, k, v)
    check_block_sizes("flash_attention", LANES, block_q=block_q, block_k=block_k)
    attention = functools.partial(_local_attention, block_q=block_q, block_k=block_k, interpret=interpret)
    out = on_mesh_axes(attention, q, k, v)
    return attention(q, k, v) if out is None else out




def _local_attention(q, k, v, *, block_q, block_k, interpret):
    """The kernels on one device's [B, L, H, D] arrays."""
    batch, q_len, heads, head_dim = q.shape
    kv_len = k.shape[1]
    block_q = min(block_q or DEFAULT_BLOCK, _round_up(q_len, LANES))
    block_k = min(block_k or DEFAULT_BLOCK, _round_up(kv_len, LANES))
    # [B, L, H, D] -> [B, H, L, D]: each grid step then reads one contiguous [block, D] tile.
    q, k, v = (jnp.swapaxes(t, 1, 2) for t in (q, k, v))
    q = _pad_sequence(q, block_q)
    k, v = (_pad_sequence(t, block_k) for t in (k, v))
    out = _flash(q, k, v, kv_len, block_q, block_k, interpret)
    return jnp.swapaxes(out[:, :, :q_len], 1, 2)


def _check_inputs(q, k, v) -> None:
    check_qkv(q, k, v)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _pad_sequence(t: jax.Array, block: int) -> jax.Array:
    extra = _round_up(t.shape[2], block) - t.shape[2]
    return jnp.pad(t, [(0, 0), (0, 0), (0, extra), (0, 0)]) if extra else t


# ----------------------------------------------------------------------------------------------
# custom_vjp over padded [B, H, L, D] tensors; kv_len (true key count), blocks, interpret static.


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _flash(q, k, v, kv_len, block_q, block_k, interpret):
    out, _ = _forward(q, k, v, kv_len, block_q, block_k, interpret)
    return out


def _flash_fwd(q, k, v, kv_len, block_q, block_k, interpret):
    out, lse = _forward(q, k, v, kv_len, block_q, block_k, interpret)
    return out, (q, k, v, out, lse)


def _flash_bwd(kv_len, block_q, block_k, interpret, residuals, d_out):
    q, k, v, out, lse = residuals
    # D_i = rowsum(dO * O): the softmax-Jacobian term shared by every key block of row i.
    di = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)[:, :, None, :]
    dq = _backward_dq(q, k, v, d_out, lse, di, kv_len, block_q, block_k, interpret)
    dk, dv = _backward_dkv(q, k, v, d_out, lse, di, kv_len, block_q, block_k, interpret)
    return dq, dk, dv


_flash.defvjp(_flash_fwd, _flash_bwd)


def _interpret_params(interpret: bool):
    # TPU interpret mode (not the generic HLO interpreter): it checks the Mosaic-specific parts
    # (VMEM scratch, dimension semantics) on CPU.
    return pltpu.InterpretParams() if interpret else False


def _compiler_params():
    # The last grid axis accumulates into scratch, so it must run in order on one core.
    return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"))


def _result(like: jax.Array, shape, dtype) -> jax.ShapeDtypeStruct:
    """A kernel output shape that varies over the same shard_map axes as `like` (check_vma
    inside `jax.shard_map` needs this said explicitly; outside one it is empty)."""
    return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=jax.typeof(like).manual_axis_type)


def _logits(a, b, key_block, *, key_axis, scale, kv_len, block_k, masked):
    """Scaled fp32 logits a @ b.T of two [block, D] tiles; one of them holds keys, and `key_axis`
    (1: b is k, 0: a is k) says which axis of the result counts them. Padded keys get MASKED_LOGIT."""
    s = jax.lax.dot_general(a, b, _CONTRACT_LAST, preferred_element_type=jnp.float32) * scale
    if masked:
        key = key_block * block_k + jax.lax.broadcasted_iota(jnp.int32, s.shape, key_axis)
        s = jnp.where(key < kv_len, s, MASKED_LOGIT)
    return s


def _column_to_row(column):
    """[n, 1] -> [1, n] through a lane-aligned [n, 128] -> [128, n] transpose (Mosaic-friendly)."""
    return jnp.transpose(jnp.broadcast_to(column, (column.shape[0], LANES)))[:1]


def _row_to_column(row):
    """[1, n] -> [n, 1], the inverse of `_column_to_row`."""
    return jnp.transpose(jnp.broadcast_to(row, (LANES, row.shape[1])))[:, :1]


def _cost(q, k, *, matmuls: int, once: tuple, repeated: tuple, repeats: int) -> pl.CostEstimate:
    """What XLA's cost analysis should count for a kernel (a custom call is opaque to it):
    `matmuls` [L, S] x D products, one exp per logit; the arrays in `once` move once, those in
    `repeated` once per block of the outer sequence axis (`repeats` times)."""
    batch, heads, q_len, head_dim = q.shape
    pairs = batch * heads * q_len * k.shape[2]
    return pl.CostEstimate(flops=2 * matmuls * pairs * head_dim, transcendentals=pairs,
                           bytes_accessed=_nbytes(*once) + repeats * _nbytes(*repeated))


def _nbytes(*arrays) -> int:
    return sum(math.prod(a.shape) * jnp.dtype(a.dtype).itemsize for a in arrays)


# ----------------------------------------------------------------------------------------------
# Forward


def _forward_kernel(q_ref, k_ref, v_ref, out_ref, lse_ref, max_ref, sum_ref, acc_ref, *,
                    scale, kv_len, block_k, masked):
    key_block = pl.program_id(3)

    @pl.when(key_block == 0)
    def _init():
        max_ref[...] = jnp.full(max_ref.shape, MASKED_LOGIT, jnp.float32)
        sum_ref[...] = jnp.zeros(sum_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    s = _logits(q_ref[...], k_ref[...], key_block, key_axis=1, scale=scale, kv_len=kv_len, block_k=block_k,
                masked=masked)  # [block_q, block_k]
    previous_max = max_ref[...]
    new_max = jnp.maximum(previous_max, jnp.max(s, axis=1, keepdims=True))
    p = jnp.exp(s - new_max)
    correction = jnp.exp(previous_max - new_max)
    sum_ref[...] = correction * sum_ref[...] + jnp.sum(p, axis=1, keepdims=True)
    v = v_ref[...]
    acc_ref[...] = correction * acc_ref[...] + jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    max_ref[...] = new_max

    @pl.when(key_block == pl.num_programs(3) - 1)
    def _finish():
        total = sum_ref[...]
        out_ref[...] = (acc_ref[...] / total).astype(out_ref.dtype)
        lse_ref[...] = _column_to_row(max_ref[...] + jnp.log(total))


def _specs(block_q, block_k, head_dim, *, queries_outer: bool):
    """BlockSpecs for [B, H, L, D] query-side tiles, key-side tiles and [B, H, 1, L] query rows,
    on a grid (b, h, outer, inner) whose outer axis walks query blocks (or key blocks).

    Per-query statistics (logsumexp, D_i) are lane-dense rows in HBM: a [L, 1] column would be
    padded to 128 lanes there (128x the bytes)."""
    q_block = (lambda b, h, i, j: (b, h, i, 0)) if queries_outer else (lambda b, h, i, j: (b, h, j, 0))
    k_block = (lambda b, h, i, j: (b, h, j, 0)) if queries_outer else (lambda b, h, i, j: (b, h, i, 0))
    row_block = (lambda b, h, i, j: (b, h, 0, i)) if queries_outer else (lambda b, h, i, j: (b, h, 0, j))
    return (pl.BlockSpec((None, None, block_q, head_dim), q_block),
            pl.BlockSpec((None, None, block_k, head_dim), k_block),
            pl.BlockSpec((None, None, 1, block_q), row_block))


def _forward(q, k, v, kv_len, block_q, block_k, interpret):
    batch, heads, q_len, head_dim = q.shape
    grid = (batch, heads, q_len // block_q, k.shape[2] // block_k)
    q_spec, kv_spec, row_spec = _specs(block_q, block_k, head_dim, queries_outer=True)
    kernel = functools.partial(_forward_kernel, scale=1.0 / math.sqrt(head_dim), kv_len=kv_len,
                               block_k=block_k, masked=k.shape[2] != kv_len)
    out_shapes = (_result(q, q.shape, q.dtype), _result(q, (batch, heads, 1, q_len), jnp.float32))
    return pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=[q_spec, kv_spec, kv_spec],
        out_specs=[q_spec, row_spec],
        out_shape=out_shapes,
        scratch_shapes=[pltpu.VMEM((block_q, 1), jnp.float32), pltpu.VMEM((block_q, 1), jnp.float32),
                        pltpu.VMEM((block_q, head_dim), jnp.float32)],
        compiler_params=_compiler_params(),
        cost_estimate=_cost(q, k, matmuls=2, once=(q, q, *out_shapes[1:]), repeated=(k, v), repeats=grid[2]),
        interpret=_interpret_params(interpret),
        name="helios_flash_forward",
    )(q, k, v)


# ----------------------------------------------------------------------------------------------
# Backward: dq (grid over key blocks innermost) and dk/dv (grid over query blocks innermost).
# With s = scale * q k^T and p = softmax(s): dv = p^T dO, dS = p * (dO v^T - D_i),
# dq = scale * dS k, dk = scale * dS^T q. Masked keys have p == 0, hence zero gradient.


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, dq_ref, dq_acc_ref, lse_column_ref, di_column_ref, *,
               scale, kv_len, block_k, masked):
    key_block = pl.program_id(3)

    @pl.when(key_block == 0)
    def _init():
        dq_acc_ref[...] = jnp.zeros(dq_acc_ref.shape, jnp.float32)
        # The row statistics as columns once per query block: they broadcast along [block_q, block_k].
        lse_column_ref[...] = _row_to_column(lse_ref[...])
        di_column_ref[...] = _row_to_column(di_ref[...])

    k = k_ref[...]
    s = _logits(q_ref[...], k, key_block, key_axis=1, scale=scale, kv_len=kv_len, block_k=block_k, masked=masked)
    p = jnp.exp(s - lse_column_ref[...])  # [block_q, block_k]; masked keys: exp(-1e30 - lse) == 0
    dp = jax.lax.dot_general(do_ref[...], v_ref[...], _CONTRACT_LAST, preferred_element_type=jnp.float32)
    ds = p * (dp - di_column_ref[...])
    dq_acc_ref[...] += jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

    @pl.when(key_block == pl.num_programs(3) - 1)
    def _finish():
        dq_ref[...] = (dq_acc_ref[...] * scale).astype(dq_ref.dtype)


def _backward_dq(q, k, v, d_out, lse, di, kv_len, block_q, block_k, interpret):
    batch, heads, q_len, head_dim = q.shape
    grid = (batch, heads, q_len // block_q, k.shape[2] // block_k)
    q_spec, kv_spec, row_spec = _specs(block_q, block_k, head_dim, queries_outer=True)
    kernel = functools.partial(_dq_kernel, scale=1.0 / math.sqrt(head_dim), kv_len=kv_len,
                               block_k=block_k, masked=k.shape[2] != kv_len)
    return pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=[q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec],
        out_specs=q_spec,
        out_shape=_result(q, q.shape, q.dtype),
        scratch_shapes=[pltpu.VMEM((block_q, head_dim), jnp.float32), pltpu.VMEM((block_q, 1), jnp.float32),
                        pltpu.VMEM((block_q, 1), jnp.float32)],
        compiler_params=_compiler_params(),
        cost_estimate=_cost(q, k, matmuls=3, once=(q, d_out, lse, di, q), repeated=(k, v), repeats=grid[2]),
        interpret=_interpret_params(interpret),
        name="helios_flash_backward_dq",
    )(q, k, v, d_out, lse, di)


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, dk_ref, dv_ref, dk_acc_ref, dv_acc_ref, *,
                scale, kv_len, block_k, masked):
    key_block, query_block = pl.program_id(2), pl.program_id(3)

    @pl.when(query_block == 0)
    def _init():
        dk_acc_ref[...] = jnp.zeros(dk_acc_ref.shape, jnp.float32)
        dv_acc_ref[...] = jnp.zeros(dv_acc_ref.shape, jnp.float32)

    # Transposed tiles [block_k, block_q]: the query rows lse and D_i broadcast down the sublanes
    # as they are, and p^T dO, dS^T q are plain matmuls (no in-kernel transposes).
    q, d_out = q_ref[...], do_ref[...]
    s_t = _logits(k_ref[...], q, key_block, key_axis=0, scale=scale, kv_len=kv_len, block_k=block_k, masked=masked)
    p_t = jnp.exp(s_t - lse_ref[...])
    dp_t = jax.lax.dot_general(v_ref[...], d_out, _CONTRACT_LAST, preferred_element_type=jnp.float32)
    ds_t = p_t * (dp_t - di_ref[...])
    dv_acc_ref[...] += jnp.dot(p_t.astype(d_out.dtype), d_out, preferred_element_type=jnp.float32)
    dk_acc_ref[...] += jnp.dot(ds_t.astype(q.dtype), q, preferred_element_type=jnp.float32)

    @pl.when(query_block == pl.num_programs(3) - 1)
    def _finish():
        dk_ref[...] = (dk_acc_ref[...] * scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_acc_ref[...].astype(dv_ref.dtype)


def _backward_dkv(q, k, v, d_out, lse, di, kv_len, block_q, block_k, interpret):
    batch, heads, q_len, head_dim = q.shape
    # Key blocks are the parallel axis here; query blocks (index j) are folded in sequentially.
    grid = (batch, heads, k.shape[2] // block_k, q_len // block_q)
    q_spec, kv_spec, row_spec = _specs(block_q, block_k, head_dim, queries_outer=False)
    kernel = functools.partial(_dkv_kernel, scale=1.0 / math.sqrt(head_dim), kv_len=kv_len,
                               block_k=block_k, masked=k.shape[2] != kv_len)
    return pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=[q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec],
        out_specs=[kv_spec, kv_spec],
        out_shape=[_result(k, k.shape, k.dtype), _result(v, v.shape, v.dtype)],
        scratch_shapes=[pltpu.VMEM((block_k, head_dim), jnp.float32), pltpu.VMEM((block_k, head_dim), jnp.float32)],
        compiler_params=_compiler_params(),
        cost_estimate=_cost(q, k, matmuls=4, once=(k, v, k, v), repeated=(q, d_out, lse, di), repeats=grid[2]),
        interpret=_interpret_params(interpret),
        name="helios_flash_backward_dkv",
    )(q, k, v, d_out, lse, di)
