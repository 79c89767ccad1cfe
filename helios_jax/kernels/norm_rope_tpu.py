"""q/k RMSNorm + RoPE as one Pallas (Mosaic) TPU kernel: one read and one write of q or k.

XLA splits the pair (statistics over all heads, then the interleaved pair rotation, whose
[..., head_dim/2, 2] reshape is a layout change on a TPU) into about ten HBM passes per tensor
(docs/kernels.md, bench/fusions.py). Here each grid step holds a [rows, heads * head_dim] tile in
VMEM, normalises it (fp32 statistics, the normalised value rounded to the input dtype, then times
the weight: the model's RMSNorm) and rotates each head's channel pairs with lane rolls, exactly
as `rope.apply_rope` computes them. The gradient is the XLA reference's (`jax.vjp`, recomputed):
the forward is what runs at inference.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import PartitionSpec

from helios_jax.kernels.kernel_mesh import automatic_axes, axis_if_divides, batch_axes
from helios_jax.kernels import norm_rope_math as rope
from helios_jax.kernels.norm_rope_math import rms_norm

MAX_ROWS = 128  # a [128, 5120] tile: double-buffered in and out plus fp32 temporaries fit v4's 16 MiB of VMEM
ROW_MULTIPLE = 16  # bf16 sublane tiling
TOKEN_AXIS = "seq"


def reference_norm_rope(x, weight, cos, sin, *, eps: float, head_dim: int):
    """The model's path: RMSNorm over the last axis of x [B, L, D], then RoPE per head_dim group
    with per-pair tables cos/sin [B, L, head_dim/2] (or `rope.lane_tables` [B, L, head_dim])."""
    cos, sin = rope.pair_tables(cos, sin, head_dim)
    heads = rms_norm(x, weight, eps).reshape(*x.shape[:-1], -1, head_dim)
    return rope.apply_rope(heads, cos, sin).reshape(x.shape)


def norm_rope(x, weight, cos, sin, *, eps: float, head_dim: int, interpret: bool = False):
    """`reference_norm_rope` as one kernel. Pass `rope.lane_tables` (built once per forward) to
    save building them per call. Under a mesh the kernel runs per device in a
    shard_map (tokens over data/fsdp/seq); with the channels split (tensor parallel) the norm's
    statistics span devices, so the XLA reference runs instead."""
    local = functools.partial(_norm_rope, eps=eps, head_dim=head_dim, interpret=interpret)
    mesh = jax.sharding.get_abstract_mesh()
    auto = automatic_axes(mesh)
    if not auto:
        return local(x, weight, cos, sin)
    if "tensor" in auto:
        return reference_norm_rope(x, weight, cos, sin, eps=eps, head_dim=head_dim)
    spec = PartitionSpec(batch_axes(auto, x.shape[0]), axis_if_divides(auto, TOKEN_AXIS, x.shape[1]), None)
    return jax.shard_map(local, mesh=mesh, in_specs=(spec, PartitionSpec(), spec, spec), out_specs=spec,
                         check_vma=False)(x, weight, cos, sin)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _norm_rope(x, weight, cos, sin, eps, head_dim, interpret):
    return _forward(x, weight, cos, sin, eps, head_dim, interpret)


def _norm_rope_fwd(x, weight, cos, sin, eps, head_dim, interpret):
    return _forward(x, weight, cos, sin, eps, head_dim, interpret), (x, weight, cos, sin)


def _norm_rope_bwd(eps, head_dim, interpret, residuals, d_out):
    _, pullback = jax.vjp(functools.partial(reference_norm_rope, eps=eps, head_dim=head_dim), *residuals)
    return pullback(d_out)


_norm_rope.defvjp(_norm_rope_fwd, _norm_rope_bwd)


def _forward(x, weight, cos, sin, eps, head_dim, interpret):
    batch, length, dim = x.shape
    if dim % head_dim or head_dim % 128:
        raise ValueError(f"norm_rope: channels {dim} must be whole heads of a multiple of 128 lanes; head_dim {head_dim}")
    rows = batch * length
    block = min(MAX_ROWS, -(-rows // ROW_MULTIPLE) * ROW_MULTIPLE)
    if cos.shape[-1] != head_dim:
        cos, sin = rope.lane_tables(cos, sin)  # [B, L, head_dim] fp32
    flat = [a.reshape(rows, a.shape[-1]) for a in (x, cos, sin)]
    # A last block past the end reads padding and its writes there are dropped: rows are
    # independent, so no copy pads x to the block multiple.
    out = pl.pallas_call(
        functools.partial(_kernel, eps=eps, head_dim=head_dim),
        grid=(pl.cdiv(rows, block),),
        in_specs=[pl.BlockSpec((block, dim), lambda i: (i, 0)),
                  pl.BlockSpec((1, dim), lambda i: (0, 0)),
                  pl.BlockSpec((block, head_dim), lambda i: (i, 0)),
                  pl.BlockSpec((block, head_dim), lambda i: (i, 0))],
        out_specs=pl.BlockSpec((block, dim), lambda i: (i, 0)),
        out_shape=jax.ShapeDtypeStruct((rows, dim), x.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)),
        interpret=pltpu.InterpretParams() if interpret else False,
        name="norm_rope",
    )(flat[0], weight.reshape(1, dim), flat[1], flat[2])
    return out.reshape(batch, length, dim)


def _kernel(x_ref, weight_ref, cos_ref, sin_ref, out_ref, *, eps, head_dim):
    x = x_ref[...].astype(jnp.float32)
    normed = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)
    normed = (normed.astype(x_ref.dtype) * weight_ref[...].astype(x_ref.dtype)).astype(jnp.float32)
    cos, sin = cos_ref[...], sin_ref[...]
    shape = (x.shape[0], head_dim)
    lane = jax.lax.broadcasted_iota(jnp.int32, shape, 1)
    first = lane % 2 == 0
    # Which roll brings channel j + 1 to lane j: asked of the lane indices themselves, so the
    # result does not depend on the roll's direction convention.
    up = pltpu.roll(lane, 1, 1)
    brings_next = up == (lane + 1) % head_dim
    for head in range(x.shape[1] // head_dim):
        lanes = slice(head * head_dim, (head + 1) * head_dim)
        v = normed[:, lanes]
        by_one, by_rest = pltpu.roll(v, 1, 1), pltpu.roll(v, head_dim - 1, 1)
        following = jnp.where(brings_next, by_one, by_rest)
        preceding = jnp.where(brings_next, by_rest, by_one)
        partner = jnp.where(first, following, preceding)
        out_ref[:, lanes] = (v * cos + partner * sin).astype(out_ref.dtype)
