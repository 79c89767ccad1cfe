"""Compile the Pallas TPU flash attention (forward + backward) for a real TPU without having one.

libtpu describes a slice as abstract devices; `jit(...).lower(...).compile()` on one of them runs
the Mosaic compiler on the kernels, so a kernel that would not lower (bad block shape, VMEM
overflow) fails here, and the compiler's cost and memory figures come back for docs/scaling.md.
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
from jax.sharding import SingleDeviceSharding

from helios_jax.tpu_topology import quiet_libtpu_environment, topology_devices

MOSAIC_CALL = "tpu_custom_call"  # how a compiled Pallas TPU kernel appears in the TPU HLO


def compile_flash_attention(topology: str = "v5p:2x2x1", *, batch: int = 1, heads: int = 40, q_len: int = 11040,
                            kv_len: int | None = None, head_dim: int = 128, dtype: str = "bfloat16",
                            block_q: int | None = None, block_k: int | None = None) -> dict:
    """Compile out, (dq, dk, dv) = vjp(flash_attention) on one chip of `topology`.

    Shapes are [batch, length, heads, head_dim]; kv_len defaults to q_len (self-attention).
    Returns the compiler's figures for that one chip: flops, transcendentals, bytes_accessed,
    argument/output/temp/code bytes, peak_bytes (their sum), kernels (Mosaic calls in the
    program), device_kind and compile_seconds.
    """
    from helios_jax.kernels.flash_tpu import flash_attention

    quiet_libtpu_environment(topology)
    device = topology_devices(topology)[0]
    sharding = SingleDeviceSharding(device)
    kv_len = q_len if kv_len is None else kv_len
    query = jax.ShapeDtypeStruct((batch, q_len, heads, head_dim), jnp.dtype(dtype), sharding=sharding)
    key = jax.ShapeDtypeStruct((batch, kv_len, heads, head_dim), jnp.dtype(dtype), sharding=sharding)

    def forward_and_backward(q, k, v, d_out):
        out, pullback = jax.vjp(lambda q, k, v: flash_attention(q, k, v, block_q=block_q, block_k=block_k), q, k, v)
        return out, pullback(d_out)

    start = time.perf_counter()
    compiled = jax.jit(forward_and_backward).lower(query, key, key, query).compile()
    seconds = time.perf_counter() - start
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost  # older jax: one dict per module
    memory = compiled.memory_analysis()
    figures = {
        "flops": float(cost.get("flops", float("nan"))),
        "transcendentals": float(cost.get("transcendentals", float("nan"))),
        "bytes_accessed": float(cost.get("bytes accessed", float("nan"))),
        "argument_bytes": memory.argument_size_in_bytes,
        "output_bytes": memory.output_size_in_bytes,
        "temp_bytes": memory.temp_size_in_bytes,
        "code_bytes": memory.generated_code_size_in_bytes,
    }
    figures["peak_bytes"] = sum(figures[name] for name in ("argument_bytes", "output_bytes", "temp_bytes", "code_bytes"))
    figures.update(kernels=compiled.as_text().count(MOSAIC_CALL), device_kind=device.device_kind,
                   compile_seconds=seconds)
    return figures
