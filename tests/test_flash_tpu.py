"""Pallas TPU flash attention run in Pallas' TPU interpreter on CPU: values and gradients equal
XLA attention on lengths that are not block multiples (self and cross), in fp32 and bf16; the
dispatch and shard_map paths use it; and the Mosaic kernels compile for a real TPU (libtpu)."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from helios_jax.kernels import dot_product_attention
from tests.attention_checks import qkv, relative_error, value_and_grads, xla_attention
from helios_jax.kernels.flash_tpu import flash_attention

REPO = Path(__file__).resolve().parents[1]
# Loose enough for bf16 inputs/outputs (8 mantissa bits) on both sides, tight for fp32.
TOLERANCE = {"float32": 1e-5, "bfloat16": 2e-2}










def _assert_matches_xla(attention, q, k, v, tolerance):
    out, grads = value_and_grads(attention)(q, k, v)
    reference_out, reference_grads = value_and_grads(xla_attention)(q, k, v)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert relative_error(out, reference_out) <= tolerance
    for name, ours, theirs in zip("qkv", grads, reference_grads):
        assert ours.dtype == q.dtype and bool(jnp.isfinite(ours.astype(jnp.float32)).all()), name
        assert relative_error(ours, theirs) <= tolerance, (name, relative_error(ours, theirs))


@pytest.mark.parametrize("q_len,kv_len,dtype", [
    (200, 200, "float32"),   # self: one full block of 128 + a partial one, on both axes
    (130, 77, "float32"),    # cross: Lq != Lk, 77 keys in one partial block
    (200, 200, "bfloat16"),  # bf16 in and out, fp32 inside
    (130, 200, "bfloat16"),  # cross the other way round
], ids=["self_200_fp32", "cross_130x77_fp32", "self_200_bf16", "cross_130x200_bf16"])
def test_values_and_gradients_match_xla(q_len, kv_len, dtype):
    q, k, v = qkv(q_len, kv_len, dtype=dtype)
    flash = lambda q, k, v: flash_attention(q, k, v, block_q=128, block_k=128, interpret=True)
    _assert_matches_xla(flash, q, k, v, TOLERANCE[dtype])


def test_dispatch_runs_the_kernel_with_default_blocks():
    q, k, v = qkv(77, 77, batch=2, head_dim=64, seed=1)
    attention = lambda q, k, v: dot_product_attention(q, k, v, impl="pallas_tpu", interpret=True)
    assert "pallas_call" in str(jax.make_jaxpr(attention)(q, k, v))  # the kernel, not a fallback to XLA
    _assert_matches_xla(attention, q, k, v, 1e-5)


@pytest.mark.parametrize("kwargs,match", [
    (dict(block_q=100), "block_q"),
    (dict(block_k=0), "block_k"),
])
def test_bad_block_size_is_one_clear_error(kwargs, match):
    q, k, v = qkv(20, 20, head_dim=8)
    with pytest.raises(ValueError, match=match):
        flash_attention(q, k, v, interpret=True, **kwargs)


def test_mismatched_inputs_are_one_clear_error():
    q, k, v = qkv(20, 30, head_dim=8)
    with pytest.raises(ValueError, match="k and v"):
        flash_attention(q, k, v[:, :10], interpret=True)
    with pytest.raises(ValueError, match="q .* and k"):
        flash_attention(q, k[:, :, :1], v[:, :, :1], interpret=True)


def _run(script: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], env=env, capture_output=True,
                          text=True, timeout=timeout)


SHARD_MAP_SCRIPT = """
import os
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from helios_jax.kernels import dot_product_attention, sequence_parallel_attention
from helios_jax.parallel import make_mesh

rng = np.random.default_rng(0)
q, k, v = (jnp.asarray(rng.standard_normal((1, 130, 8, 64)), jnp.float32) for _ in range(3))


def value_and_grads(attention):
    def run(q, k, v):
        out, pullback = jax.vjp(attention, q, k, v)
        return out, pullback(jnp.cos(out))  # the gradients of sum(sin(out))
    return jax.jit(run)


plain = lambda q, k, v: dot_product_attention(q, k, v, impl="xla")
reference = value_and_grads(plain)(q, k, v)
error = lambda a, b: float(jnp.abs(a - b).max() / jnp.abs(b).max())

# Heads split over 8 devices, the kernel per device on one head; then Ulysses over seq=4
# (all-to-alls around the kernel, 130 tokens padded to 132 and sliced back to 130 inside).
spec = PartitionSpec(None, None, "tensor", None)
heads_mesh = make_mesh(tensor=8)
per_head = lambda q, k, v: jax.shard_map(
    lambda q, k, v: dot_product_attention(q, k, v, impl="pallas_tpu", interpret=True),
    mesh=heads_mesh, in_specs=(spec,) * 3, out_specs=spec)(q, k, v)
seq_mesh = make_mesh(seq=4)
ulysses = lambda q, k, v: sequence_parallel_attention(q, k, v, mesh=seq_mesh, strategy="ulysses",
                                                      impl="pallas_tpu", interpret=True)
for name, attention in (("heads over tensor=8", per_head), ("ulysses over seq=4", ulysses)):
    out, grads = value_and_grads(attention)(q, k, v)
    value = error(out, reference[0])
    grad = max(error(a, b) for a, b in zip(grads, reference[1]))
    print(f"{name}: value {value:.2e} grad {grad:.2e}")
    assert value <= 1e-5 and grad <= 1e-5, (name, value, grad)

# Called under a mesh without a shard_map (as the transformer does): flash_attention splits itself
# (batch over data, queries over seq, heads over tensor); cross-attention, k/v whole per device.
q = jnp.asarray(rng.standard_normal((2, 130, 4, 64)), jnp.float32)
k, v = (jnp.asarray(rng.standard_normal((2, 77, 4, 64)), jnp.float32) for _ in range(2))
reference = value_and_grads(plain)(q, k, v)
mesh = make_mesh(data=2, tensor=2, seq=2)
with jax.set_mesh(mesh):
    flash = value_and_grads(lambda q, k, v: dot_product_attention(q, k, v, impl="pallas_tpu", interpret=True))
    assert "shard_map" in str(jax.make_jaxpr(flash)(q, k, v))
    out, grads = flash(q, k, v)
value = error(out, reference[0])
grad = max(error(a, b) for a, b in zip(grads, reference[1]))
print(f"under set_mesh data=2 tensor=2 seq=2: value {value:.2e} grad {grad:.2e}")
assert value <= 1e-5 and grad <= 1e-5, (value, grad)
print("shard_map ok")
"""


def test_kernel_inside_shard_map_matches_unsharded_attention():
    result = _run(SHARD_MAP_SCRIPT)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "shard_map ok" in result.stdout


COMPILE_SCRIPT = """
from helios_jax.kernels.flash_tpu_compile import compile_flash_attention

for dtype in ("bfloat16", "float32"):
    figures = compile_flash_attention("v5p:2x2x1", batch=1, heads=2, q_len=200, kv_len=77, head_dim=128, dtype=dtype)
    print(dtype, figures)
    # forward + dq + dk/dv, each a Mosaic kernel compiled for the chip
    assert figures["kernels"] == 3 and figures["device_kind"].startswith("TPU v5"), figures
    # 9 [L, S] x D matmuls (2 forward, 3 dq, 4 dk/dv) over the padded 256 x 128 tokens, 2 heads
    assert figures["flops"] >= 2 * 9 * 2 * 256 * 128 * 128, figures
    assert figures["peak_bytes"] > 0 and figures["bytes_accessed"] > 0, figures

# On a 4-chip mesh the Mosaic calls cannot be partitioned by the compiler: flash_attention puts
# them in a shard_map itself (heads over tensor), so each chip runs them on its heads, no gathers.
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from helios_jax.tpu_topology import topology_devices
from helios_jax.kernels.flash_tpu import flash_attention
from helios_jax.parallel import make_mesh

mesh = make_mesh(tensor=4, devices=topology_devices("v5p:2x2x1"))
x = jax.ShapeDtypeStruct((1, 200, 8, 128), jnp.bfloat16, sharding=NamedSharding(mesh, PartitionSpec(None, None, "tensor")))
with jax.set_mesh(mesh):
    program = jax.jit(lambda q, k, v: jax.grad(lambda q, k, v: flash_attention(q, k, v).astype(jnp.float32).sum(),
                                               argnums=(0, 1, 2))(q, k, v)).lower(x, x, x).compile().as_text()
assert program.count("tpu_custom_call") == 3 and "all-gather" not in program
print("compile ok")
"""


def test_kernels_compile_for_a_real_tpu_topology():
    # A subprocess: libtpu reads its environment when it loads (compile_flash_attention sets it first).
    result = _run(COMPILE_SCRIPT, env={"JAX_PLATFORMS": "cpu"})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "compile ok" in result.stdout
