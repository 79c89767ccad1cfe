"""Flash attention for NVIDIA GPUs: Pallas kernels on the Triton backend, differentiable.

`flash_attention(q, k, v)` takes [B, L, H, D] tensors (the layout of `jax.nn.dot_product_attention`),
no mask, scale 1/sqrt(D). Three kernels, FlashAttention-2 style:

* forward: one program per (q block, batch, head); an inner loop over key blocks keeps the online
  softmax (running max m, running sum l, output accumulator) in fp32 and saves the base-2
  logsumexp of each query row for the backward pass;
* dk/dv: one program per (key block, batch, head), looping over query blocks;
* dq: one program per (q block, batch, head), looping over key blocks.
The backward also needs D_i = rowsum(dO * O), a cheap elementwise reduction left to XLA.

Lengths need not be multiples of the blocks and q/k lengths may differ. Blocks tiled by the grid
(q blocks in the forward and dq kernels, key blocks in dk/dv) are bounds-masked by the Triton
lowering itself, and their out-of-range rows only ever feed rows that are never stored. Blocks
the kernels slice themselves (key blocks in the forward and dq loops, query blocks in the dk/dv
loop) are loaded with an explicit mask filling zeros, and only the last, partial block takes
that masked path: its out-of-range keys get probability exactly 0, so every stored value is
free of padding and NaN.

Logits are scaled by scale * log2(e) so the softmax runs on exp2 (one multiply folded into the
scale; the saved logsumexp is in base 2 too).
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from helios_jax.kernels.attention_inputs import check_qkv

LOG2_E = math.log2(math.e)

# H100, head dim 128, bf16: a 128-row q tile keeps the tensor cores busy, 64-key tiles keep the
# fp32 accumulator plus the double/triple-buffered k/v tiles within registers and shared memory
# at 8 warps. The backward holds two fp32 accumulators per program, hence its smaller tiles.
FORWARD_BLOCKS = (128, 64)  # (block_q, block_k)
BACKWARD_BLOCKS = (64, 64)  # (query tile, key tile) of both backward kernels
FORWARD_STAGES = 3
BACKWARD_STAGES = 2
MIN_BLOCK = 16  # the smallest tile Triton's tensor-core dot takes


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Static tiling of one attention call (hashable: it is a non-differentiable custom_vjp argument)."""

    kv_len: int  # keys past it (padding of very short sequences) are masked
    block_q: int
    block_k: int
    block_q_bwd: int
    block_k_bwd: int
    num_warps: int
    num_stages: int
    num_stages_bwd: int
    interpret: bool


def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, block_q: int | None = None,
                    block_k: int | None = None, num_warps: int | None = None, num_stages: int | None = None,
                    interpret: bool = False) -> jax.Array:
    """Softmax(q k^T / sqrt(D)) v over [B, L, H, D] tensors; returns q.dtype, differentiable.

    block_q / block_k: forward tiles (powers of two, at least 16); the backward uses tiles of at most
    64 each. num_warps / num_stages override the Triton defaults of every kernel. `interpret` runs the
    kernels in the Pallas interpreter (any backend, for tests).
    """
    _check_inputs(q, k, v)
    for name, value in (("block_q", block_q), ("block_k", block_k)):
        if value is not None and (value < MIN_BLOCK or value & (value - 1)):
            raise ValueError(f"flash_attention {name} must be a power of two >= {MIN_BLOCK}, got {value}")
    q_len, kv_len, head_dim = q.shape[1], k.shape[1], q.shape[3]
    # Sequences shorter than the smallest tile are zero-padded to it (keys past kv_len are masked
    # in the kernels, extra query rows dropped): only tiny test or text shapes take this path.
    q, k, v = (_pad_rows(t, MIN_BLOCK) for t in (q, k, v))
    block_q = _fit_block(block_q or FORWARD_BLOCKS[0], q.shape[1])
    block_k = _fit_block(block_k or FORWARD_BLOCKS[1], k.shape[1])
    config = KernelConfig(
        kv_len=kv_len,
        block_q=block_q,
        block_k=block_k,
        block_q_bwd=_fit_block(min(block_q, BACKWARD_BLOCKS[0]), q.shape[1]),
        block_k_bwd=_fit_block(min(block_k, BACKWARD_BLOCKS[1]), k.shape[1]),
        num_warps=num_warps or (8 if head_dim >= 128 else 4),
        num_stages=num_stages or FORWARD_STAGES,
        num_stages_bwd=num_stages or BACKWARD_STAGES,
        interpret=interpret,
    )
    out = _flash(q, k, v, config)
    return out if out.shape[1] == q_len else out[:, :q_len]


def _check_inputs(q, k, v):
    check_qkv(q, k, v)
    head_dim = q.shape[3]
    if head_dim < MIN_BLOCK or head_dim & (head_dim - 1):
        raise ValueError(f"flash_attention head dim (q.shape[3]) must be a power of two >= {MIN_BLOCK}, "
                         f"got {head_dim}")


def _fit_block(block: int, length: int) -> int:
    """No tile longer than the sequence (length >= MIN_BLOCK): short sequences waste no work and
    a tile sliced out of a whole-sequence ref always fits inside it."""
    return min(block, 1 << (length.bit_length() - 1))


def _pad_rows(t: jax.Array, rows: int) -> jax.Array:
    if t.shape[1] >= rows:
        return t
    return jnp.pad(t, [(0, 0), (0, rows - t.shape[1]), (0, 0), (0, 0)])


# ---------------------------------------------------------------------------------------------
# custom_vjp wiring


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _flash(q, k, v, config: KernelConfig):
    return _forward(q, k, v, config)[0]


def _flash_fwd(q, k, v, config: KernelConfig):
    out, lse = _forward(q, k, v, config)
    return out, (q, k, v, out, lse)


def _flash_bwd(config: KernelConfig, residuals, d_out):
    q, k, v, out, lse = residuals
    d_out = d_out.astype(q.dtype)
    # D_i = rowsum(dO * O) in fp32: an elementwise product and reduction XLA fuses into one pass.
    delta = jnp.einsum("bqhd,bqhd->bhq", out.astype(jnp.float32), d_out.astype(jnp.float32))
    dk, dv = _backward_dkdv(q, k, v, d_out, lse, delta, config)
    dq = _backward_dq(q, k, v, d_out, lse, delta, config)
    return dq, dk, dv


_flash.defvjp(_flash_fwd, _flash_bwd)


# ---------------------------------------------------------------------------------------------
# shared pieces


def _compiler_params(config: KernelConfig, stages: int):
    return plgpu.CompilerParams(num_warps=config.num_warps, num_stages=stages)


def _like(source: jax.Array, shape, dtype):
    """An output shape that varies over the same shard_map axes as `source` (needed under
    shard_map's check_vma, harmless outside it)."""
    return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=jax.typeof(source).mat)


def _row_block_spec(block: int, head_dim: int):
    """A [block, D] tile of a [B, L, H, D] tensor, tile index from grid axis 0."""
    return pl.BlockSpec((None, block, None, head_dim), lambda i, b, h: (b, i, h, 0))


def _whole_sequence_spec(length: int, head_dim: int):
    """All L rows of one (batch, head) of a [B, L, H, D] tensor: the kernel slices it itself."""
    return pl.BlockSpec((None, length, None, head_dim), lambda i, b, h: (b, 0, h, 0))


def _load_rows(ref, start, size: int, length: int | None):
    """Rows [start, start + size) of `ref`; with `length`, rows past it read as zeros."""
    rows = pl.ds(start, size)
    if length is None:
        return ref[rows] if ref.ndim == 1 else ref[rows, :]
    valid = start + lax.broadcasted_iota(jnp.int32, (size,), 0) < length
    if ref.ndim == 1:
        return plgpu.load(ref.at[rows], mask=valid, other=0.0)
    return plgpu.load(ref.at[rows, :], mask=valid[:, None], other=0.0)


def _blocked_loop(length: int, block: int, body, carry):
    """body(start, carry, tail_length) over the blocks of `length`: full blocks in a loop with no
    masking, then the one partial block, if any, with tail_length=length so it masks."""
    full_blocks = length // block
    # multiple_of: tiles start on multiples of their size, so Triton can vectorise the loads.
    carry = lax.fori_loop(0, full_blocks, lambda i, c: body(pl.multiple_of(i * block, block), c, None), carry)
    if length % block:
        # A traced start: a static one past the end of the ref is refused when indexing.
        carry = body(jnp.int32(full_blocks * block), carry, length)
    return carry


# ---------------------------------------------------------------------------------------------
# forward


def _forward(q, k, v, config: KernelConfig):
    batch, q_len, heads, head_dim = q.shape
    kv_len = k.shape[1]
    grid = (pl.cdiv(q_len, config.block_q), batch, heads)
    q_tile, keys = _row_block_spec(config.block_q, head_dim), _whole_sequence_spec(kv_len, head_dim)
    kernel = functools.partial(_forward_kernel, scale=1.0 / math.sqrt(head_dim), block_k=config.block_k,
                               kv_len=config.kv_len)
    out, lse = pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=[q_tile, keys, keys],
        out_specs=[q_tile, pl.BlockSpec((None, None, config.block_q), lambda i, b, h: (b, h, i))],
        out_shape=[_like(q, q.shape, q.dtype), _like(q, (batch, heads, q_len), jnp.float32)],
        compiler_params=_compiler_params(config, config.num_stages),
        interpret=config.interpret,
        name="helios_flash_forward",
    )(q, k, v)
    return out, lse


def _forward_kernel(q_ref, k_ref, v_ref, out_ref, lse_ref, *, scale: float, block_k: int, kv_len: int):
    block_q, head_dim = q_ref.shape
    q = q_ref[...]
    logit_scale = scale * LOG2_E

    def step(start, carry, tail_length):
        acc, row_max, row_sum = carry
        k = _load_rows(k_ref, start, block_k, tail_length)
        v = _load_rows(v_ref, start, block_k, tail_length)
        logits = plgpu.dot(q, k, trans_b=True) * logit_scale  # [block_q, block_k] fp32, base-2 units
        if tail_length is not None:
            key_valid = start + lax.broadcasted_iota(jnp.int32, (1, block_k), 1) < tail_length
            logits = jnp.where(key_valid, logits, -jnp.inf)
        new_max = jnp.maximum(row_max, logits.max(axis=1))
        correction = jnp.exp2(row_max - new_max)  # rescales what was summed under the old max
        probs = jnp.exp2(logits - new_max[:, None])
        row_sum = row_sum * correction + probs.sum(axis=1)
        acc = acc * correction[:, None] + plgpu.dot(probs.astype(v.dtype), v)
        return acc, new_max, row_sum

    init = (jnp.zeros((block_q, head_dim), jnp.float32),
            jnp.full((block_q,), -jnp.inf, jnp.float32),
            jnp.zeros((block_q,), jnp.float32))
    acc, row_max, row_sum = _blocked_loop(kv_len, block_k, step, init)
    out_ref[...] = (acc / row_sum[:, None]).astype(out_ref.dtype)
    lse_ref[...] = row_max + jnp.log2(row_sum)


# ---------------------------------------------------------------------------------------------
# backward


def _backward_dkdv(q, k, v, d_out, lse, delta, config: KernelConfig):
    batch, q_len, heads, head_dim = q.shape
    kv_len = k.shape[1]
    block_k = config.block_k_bwd
    grid = (pl.cdiv(kv_len, block_k), batch, heads)
    per_row = pl.BlockSpec((None, None, q_len), lambda i, b, h: (b, h, 0))
    queries, k_tile = _whole_sequence_spec(q_len, head_dim), _row_block_spec(block_k, head_dim)
    kernel = functools.partial(_dkdv_kernel, scale=1.0 / math.sqrt(head_dim), block_q=config.block_q_bwd,
                               q_len=q_len)
    return pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=[queries, k_tile, k_tile, queries, per_row, per_row],
        out_specs=[k_tile, k_tile],
        out_shape=[_like(k, k.shape, k.dtype), _like(v, v.shape, v.dtype)],
        compiler_params=_compiler_params(config, config.num_stages_bwd),
        interpret=config.interpret,
        name="helios_flash_backward_dkdv",
    )(q, k, v, d_out, lse, delta)


def _dkdv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *, scale: float,
                 block_q: int, q_len: int):
    # Query rows past q_len load as q = dO = 0, lse = delta = 0: their probabilities are finite (1)
    # and both of their contributions (p^T dO and ds^T q with ds = p * (dO v^T - delta)) are 0.
    # Key rows of this tile past kv_len only feed their own dk/dv rows, which are not stored.
    block_k, head_dim = k_ref.shape
    k = k_ref[...]
    v = v_ref[...]
    logit_scale = scale * LOG2_E

    def step(start, carry, tail_length):
        dk, dv = carry
        q = _load_rows(q_ref, start, block_q, tail_length)
        d_out = _load_rows(do_ref, start, block_q, tail_length)
        lse = _load_rows(lse_ref, start, block_q, tail_length)
        delta = _load_rows(delta_ref, start, block_q, tail_length)
        probs = jnp.exp2(plgpu.dot(q, k, trans_b=True) * logit_scale - lse[:, None])  # [block_q, block_k]
        dv = dv + plgpu.dot(probs.astype(d_out.dtype), d_out, trans_a=True)
        d_probs = plgpu.dot(d_out, v, trans_b=True)
        d_logits = probs * (d_probs - delta[:, None])
        dk = dk + plgpu.dot(d_logits.astype(q.dtype), q, trans_a=True)
        return dk, dv

    zeros = jnp.zeros((block_k, head_dim), jnp.float32)
    dk, dv = _blocked_loop(q_len, block_q, step, (zeros, zeros))
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _backward_dq(q, k, v, d_out, lse, delta, config: KernelConfig):
    batch, q_len, heads, head_dim = q.shape
    kv_len = k.shape[1]
    block_q = config.block_q_bwd
    grid = (pl.cdiv(q_len, block_q), batch, heads)
    per_row = pl.BlockSpec((None, None, block_q), lambda i, b, h: (b, h, i))
    q_tile, keys = _row_block_spec(block_q, head_dim), _whole_sequence_spec(kv_len, head_dim)
    kernel = functools.partial(_dq_kernel, scale=1.0 / math.sqrt(head_dim), block_k=config.block_k_bwd,
                               kv_len=config.kv_len)
    return pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=[q_tile, keys, keys, q_tile, per_row, per_row],
        out_specs=q_tile,
        out_shape=_like(q, q.shape, q.dtype),
        compiler_params=_compiler_params(config, config.num_stages_bwd),
        interpret=config.interpret,
        name="helios_flash_backward_dq",
    )(q, k, v, d_out, lse, delta)


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, *, scale: float, block_k: int,
               kv_len: int):
    block_q, head_dim = q_ref.shape
    q = q_ref[...]
    d_out = do_ref[...]
    lse = lse_ref[...]
    delta = delta_ref[...]
    logit_scale = scale * LOG2_E

    def step(start, dq, tail_length):
        k = _load_rows(k_ref, start, block_k, tail_length)
        v = _load_rows(v_ref, start, block_k, tail_length)
        probs = jnp.exp2(plgpu.dot(q, k, trans_b=True) * logit_scale - lse[:, None])
        if tail_length is not None:  # zero keys alone would give exp2(-lse), not 0
            key_valid = start + lax.broadcasted_iota(jnp.int32, (1, block_k), 1) < tail_length
            probs = jnp.where(key_valid, probs, 0.0)
        d_probs = plgpu.dot(d_out, v, trans_b=True)
        d_logits = probs * (d_probs - delta[:, None])
        return dq + plgpu.dot(d_logits.astype(k.dtype), k)

    dq = _blocked_loop(kv_len, block_k, step, jnp.zeros((block_q, head_dim), jnp.float32))
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)
