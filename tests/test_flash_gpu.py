"""The Pallas GPU flash attention (run in the Pallas interpreter on CPU) against XLA attention:
values and gradients, fp32 and bf16, lengths that leave a partial block, q/k lengths that
differ, through the dispatch, and inside shard_map on 8 CPU devices."""
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractDevice, AbstractMesh, AxisType, PartitionSpec, use_abstract_mesh

from helios_jax.kernels import dot_product_attention
from helios_jax.kernels.flash_gpu import flash_attention

# Relative (to the reference's largest entry) error allowed: fp32 runs the same math in another
# order; bf16 rounds the probabilities and the gradient tiles to 8 bits of mantissa.
TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


def _qkv(q_len, kv_len, dtype, batch=2, heads=2, head_dim=64, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((batch, q_len, heads, head_dim))
    k, v = (rng.standard_normal((batch, kv_len, heads, head_dim)) for _ in range(2))
    return [jnp.asarray(x, dtype) for x in (q, k, v)]


def _value_and_grads(attention):
    """One compiled function: the output and d/d(q, k, v) of sum(sin(output))."""

    def run(q, k, v):
        out, pullback = jax.vjp(attention, q, k, v)
        return out, pullback(jnp.cos(out.astype(jnp.float32)).astype(out.dtype))

    return jax.jit(run)


def _relative_error(ours, reference):
    ours, reference = (jnp.asarray(x, jnp.float32) for x in (ours, reference))
    return float(jnp.abs(ours - reference).max() / jnp.abs(reference).max())


def _xla(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, implementation="xla")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    "q_len, kv_len, block_q, block_k",
    [(200, 200, 64, 32),  # self: 3 full q blocks + 8 rows, 6 full k blocks + 8 keys
     (77, 130, 32, 64)],  # cross: Lq != Lk, both with a partial block
    ids=["self", "cross"],
)
def test_values_and_gradients_match_xla(q_len, kv_len, block_q, block_k, dtype):
    q, k, v = _qkv(q_len, kv_len, dtype)
    ours = _value_and_grads(lambda q, k, v: flash_attention(q, k, v, block_q=block_q, block_k=block_k,
                                                            interpret=True))(q, k, v)
    # The reference runs in fp32 from the same (rounded) inputs: the kernel's error, not bf16's.
    reference = _value_and_grads(_xla)(*(x.astype(jnp.float32) for x in (q, k, v)))
    out, grads = ours
    assert out.dtype == dtype and out.shape == q.shape
    assert all(g.dtype == dtype for g in grads)
    assert bool(jnp.isfinite(out).all()) and all(bool(jnp.isfinite(g).all()) for g in grads)
    errors = [_relative_error(out, reference[0])] + [_relative_error(a, b) for a, b in zip(grads, reference[1])]
    assert max(errors) <= TOLERANCE[dtype], dict(zip(["out", "dq", "dk", "dv"], errors))


def test_dispatch_routes_pallas_gpu_to_the_kernel_and_short_keys_are_padded():
    # 9 keys: shorter than the smallest tile, zero-padded to it and masked in the kernels.
    q, k, v = _qkv(45, 9, jnp.float32, batch=1, head_dim=32)
    attention = lambda q, k, v: dot_product_attention(q, k, v, impl="pallas_gpu", interpret=True)
    lowered = _value_and_grads(attention).lower(q, k, v)
    assert "helios_flash_forward" in lowered.as_text(debug_info=True)  # the kernel, not a fallback
    ours, reference = lowered.compile()(q, k, v), _value_and_grads(_xla)(q, k, v)
    errors = [_relative_error(a, b) for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(reference))]
    assert max(errors) <= 2e-5, errors


def test_bad_inputs_are_clear_errors():
    q, k, v = _qkv(16, 16, jnp.float32, head_dim=48)
    with pytest.raises(ValueError, match="head dim"):
        flash_attention(q, k, v, interpret=True)
    q, k, v = _qkv(16, 16, jnp.float32)
    with pytest.raises(ValueError, match="block_k"):
        flash_attention(q, k, v, block_k=48, interpret=True)
    with pytest.raises(ValueError, match="dtype"):
        flash_attention(q, k.astype(jnp.bfloat16), v, interpret=True)


SHARD_MAP_SCRIPT = """
import os
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"
import jax
import jax.numpy as jnp
import numpy as np

from helios_jax.kernels import dot_product_attention, sequence_parallel_attention
from helios_jax.parallel import make_mesh

mesh = make_mesh(data=2, seq=4)  # batch over data, Ulysses over seq: 4 heads -> 1 per device
rng = np.random.default_rng(0)
q, k, v = (jnp.asarray(rng.standard_normal((2, 90, 4, 32)), jnp.float32) for _ in range(3))


def value_and_grads(attention):
    def run(q, k, v):
        out, pullback = jax.vjp(attention, q, k, v)
        return out, pullback(jnp.cos(out))
    return jax.jit(run)


parallel = lambda q, k, v: sequence_parallel_attention(q, k, v, mesh=mesh, strategy="ulysses", impl="pallas_gpu",
                                                       interpret=True)
plain = lambda q, k, v: dot_product_attention(q, k, v, impl="xla")
lowered = value_and_grads(parallel).lower(q, k, v)
assert "all_to_all" in lowered.as_text(), "Ulysses path not taken"
ours, theirs = lowered.compile()(q, k, v), value_and_grads(plain)(q, k, v)
pairs = zip(jax.tree.leaves(ours), jax.tree.leaves(theirs))
errors = [float(jnp.abs(a - b).max() / jnp.abs(b).max()) for a, b in pairs]
print("errors", errors)
assert max(errors) <= 2e-5, errors
print("shard_map ok")
"""


def test_inside_shard_map_matches_unsharded_values_and_gradients():
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(SHARD_MAP_SCRIPT)], capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "shard_map ok" in result.stdout


@pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated")
def test_kernels_lower_to_triton_for_an_h100_at_helios_shapes():
    """No GPU here: lower (not compile) for an abstract H100. This runs the Pallas Triton lowering of
    all three kernels (power-of-two tiles, masks, dots) at the real shapes and default tiles, also
    inside a shard_map that keeps the vma check on."""
    h100 = AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu")
    mesh = AbstractMesh((4,), ("seq",), (AxisType.Auto,), abstract_device=h100)

    def lower(loss, *shapes):
        with use_abstract_mesh(mesh):
            traced = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(*shapes)
            text = traced.lower(lowering_platforms=("cuda",)).as_text()
        # one custom call per kernel: forward, dk/dv, dq
        assert text.count("__gpu$xla.gpu.triton") == 3, text.count("__gpu$xla.gpu.triton")

    total = lambda attention: lambda q, k, v: jnp.sum(attention(q, k, v).astype(jnp.float32))
    self_shape = jax.ShapeDtypeStruct((1, 2940, 40, 128), jnp.bfloat16)
    lower(total(flash_attention), self_shape, self_shape, self_shape)
    cross_q, cross_kv = (jax.ShapeDtypeStruct((2, n, 40, 128), jnp.float32) for n in (8640, 512))
    lower(total(flash_attention), cross_q, cross_kv, cross_kv)

    spec = PartitionSpec(None, "seq", None, None)

    def ulysses(q, k, v):  # the shape of sequence_parallel's Ulysses step, vma check on
        gather = lambda t: jax.lax.all_to_all(t, "seq", split_axis=2, concat_axis=1, tiled=True)
        out = flash_attention(gather(q), gather(k), gather(v))
        return jax.lax.all_to_all(out, "seq", split_axis=1, concat_axis=2, tiled=True)

    sharded = lambda q, k, v: jax.shard_map(ulysses, mesh=mesh, in_specs=(spec,) * 3, out_specs=spec)(q, k, v)
    long_shape = jax.ShapeDtypeStruct((1, 4560, 40, 128), jnp.bfloat16)
    lower(total(sharded), long_shape, long_shape, long_shape)
