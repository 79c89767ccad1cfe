"""jax's splash attention behind `impl="splash_tpu"`, run in Pallas' TPU interpreter on CPU: values
and gradients equal XLA attention on lengths that are not block multiples (self and cross), fp32
tightly and bf16 no worse than XLA's own bf16; the dispatch, mesh and shard_map paths use it; and
the Mosaic kernels compile for a real TPU (libtpu) at a Helios-like length."""
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
from helios_jax.kernels.splash_tpu import splash_attention

REPO = Path(__file__).resolve().parents[1]
FP32_TOLERANCE = 1e-5
# bf16: splash's error against fp32 attention may exceed XLA-bf16's by this factor plus a bit
# (different but equally valid roundings: q pre-scaled in bf16, fp32 probabilities times v).
BF16_FACTOR, BF16_SLACK = 1.5, 1e-3










def _splash(q, k, v):
    return splash_attention(q, k, v, block_q=128, block_k=128, interpret=True)


def _errors(attention, q, k, v, reference_inputs):
    """Relative errors of out, dq, dk, dv against XLA attention on `reference_inputs`."""
    out, grads = value_and_grads(attention)(q, k, v)
    reference_out, reference_grads = value_and_grads(xla_attention)(*reference_inputs)
    assert out.dtype == q.dtype and out.shape == q.shape
    for grad in grads:
        assert grad.dtype == q.dtype and bool(jnp.isfinite(grad.astype(jnp.float32)).all())
    return [relative_error(ours, theirs) for ours, theirs in zip((out, *grads), (reference_out, *reference_grads))]


@pytest.mark.parametrize("q_len,kv_len", [(200, 200), (130, 77)], ids=["self_200", "cross_130x77"])
def test_fp32_values_and_gradients_match_xla(q_len, kv_len):
    q, k, v = qkv(q_len, kv_len)
    errors = _errors(_splash, q, k, v, (q, k, v))
    assert max(errors) <= FP32_TOLERANCE, dict(zip(("out", "dq", "dk", "dv"), errors))


def test_bf16_is_no_worse_than_xla_bf16():
    q, k, v = qkv(130, 200, dtype="bfloat16")
    exact = tuple(t.astype(jnp.float32) for t in (q, k, v))
    ours = _errors(_splash, q, k, v, exact)
    xla = _errors(xla_attention, q, k, v, exact)
    for name, mine, theirs in zip(("out", "dq", "dk", "dv"), ours, xla):
        assert mine <= BF16_FACTOR * theirs + BF16_SLACK, (name, mine, theirs)


def test_dispatch_runs_splash_with_default_blocks():
    q, k, v = qkv(77, 77, batch=2, seed=1)
    attention = lambda q, k, v: dot_product_attention(q, k, v, impl="splash_tpu", interpret=True)  # noqa: E731
    assert "pallas_call" in str(jax.make_jaxpr(attention)(q, k, v))  # the kernel, not a fallback to XLA
    assert max(_errors(attention, q, k, v, (q, k, v))) <= FP32_TOLERANCE


@pytest.mark.parametrize("kwargs,match", [(dict(block_q=100), "block_q"), (dict(block_k=0), "block_k")])
def test_bad_block_size_is_one_clear_error(kwargs, match):
    q, k, v = qkv(20, 20)
    with pytest.raises(ValueError, match=match):
        splash_attention(q, k, v, interpret=True, **kwargs)


def test_mismatched_inputs_are_one_clear_error():
    q, k, v = qkv(20, 30)
    with pytest.raises(ValueError, match="splash_attention: k and v"):
        splash_attention(q, k, v[:, :10], interpret=True)


def _run(script: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], env=env, capture_output=True,
                          text=True, timeout=timeout)


MESH_SCRIPT = """
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
splash = lambda q, k, v: dot_product_attention(q, k, v, impl="splash_tpu", interpret=True)
plain = lambda q, k, v: dot_product_attention(q, k, v, impl="xla")
error = lambda a, b: float(jnp.abs(a - b).max() / jnp.abs(b).max())


def value_and_grads(attention):
    def run(q, k, v):
        out, pullback = jax.vjp(attention, q, k, v)
        return out, pullback(jnp.cos(out))  # the gradients of sum(sin(out))
    return jax.jit(run)


def check(name, attention, q, k, v):
    out, grads = value_and_grads(attention)(q, k, v)
    reference = value_and_grads(plain)(q, k, v)
    value = error(out, reference[0])
    grad = max(error(a, b) for a, b in zip(grads, reference[1]))
    print(f"{name}: value {value:.2e} grad {grad:.2e}")
    assert value <= 1e-5 and grad <= 1e-5, (name, value, grad)


# Under a mesh without a shard_map (as the transformer calls it): splash splits itself (batch over
# data, queries over seq, heads over tensor); cross-attention, k/v whole per device.
q = jnp.asarray(rng.standard_normal((2, 130, 4, 128)), jnp.float32)
k, v = (jnp.asarray(rng.standard_normal((2, 77, 4, 128)), jnp.float32) for _ in range(2))
with jax.set_mesh(make_mesh(data=2, tensor=2, seq=2)):
    assert "shard_map" in str(jax.make_jaxpr(splash)(q, k, v))
    check("set_mesh data=2 tensor=2 seq=2", splash, q, k, v)

# Ulysses over seq=4: all-to-alls around splash on 2 of 8 heads, 130 tokens padded to 132.
q, k, v = (jnp.asarray(rng.standard_normal((1, 130, 8, 128)), jnp.float32) for _ in range(3))
seq_mesh = make_mesh(seq=4)
check("ulysses seq=4", lambda q, k, v: sequence_parallel_attention(
    q, k, v, mesh=seq_mesh, strategy="ulysses", impl="splash_tpu", interpret=True), q, k, v)

# Inside a shard_map that checks varying axes (compiled Ulysses does): splash's forward in a
# nested unchecked shard_map. Forward only here: the interpreter loses the varying types our
# flash backward declares (the compile test below lowers that backward).
spec = PartitionSpec(None, None, "seq", None)
checked = jax.jit(jax.shard_map(splash, mesh=seq_mesh, in_specs=(spec,) * 3, out_specs=spec, check_vma=True))
value = error(checked(q, k, v), plain(q, k, v))
print(f"check_vma=True heads over seq=4: value {value:.2e}")
assert value <= 1e-5, value
print("mesh ok")
"""


def test_splash_under_a_mesh_and_inside_shard_map_matches_xla():
    result = _run(MESH_SCRIPT)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "mesh ok" in result.stdout


COMPILE_SCRIPT = """
from helios_jax.tpu_topology import quiet_libtpu_environment, topology_devices

quiet_libtpu_environment("v5p:2x2x1")
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec, SingleDeviceSharding

from helios_jax.kernels import dot_product_attention, sequence_parallel_attention
from helios_jax.parallel import make_mesh

devices = topology_devices("v5p:2x2x1")
splash = lambda q, k, v: dot_product_attention(q, k, v, impl="splash_tpu")


def grads(attention):
    return jax.jit(lambda q, k, v: jax.grad(lambda q, k, v: attention(q, k, v).astype(jnp.float32).sum(),
                                            argnums=(0, 1, 2))(q, k, v))


def forward_and_backward(q, k, v):
    out, pullback = jax.vjp(splash, q, k, v)
    return out, pullback(out)


# A Helios-like odd length (2,940 video + 61 history tokens) on one chip, bf16: forward, dq, dk/dv.
x = jax.ShapeDtypeStruct((1, 3001, 2, 128), jnp.bfloat16, sharding=SingleDeviceSharding(devices[0]))
program = jax.jit(forward_and_backward).lower(x, x, x).compile().as_text()
assert program.count("tpu_custom_call") == 3, program.count("tpu_custom_call")

# A 4-chip mesh, heads over tensor: splash wraps itself in a shard_map, no gathers.
mesh = make_mesh(tensor=4, devices=devices)
heads_split = NamedSharding(mesh, PartitionSpec(None, None, "tensor"))
x = jax.ShapeDtypeStruct((1, 300, 8, 128), jnp.bfloat16, sharding=heads_split)
with jax.set_mesh(mesh):
    program = grads(splash).lower(x, x, x).compile().as_text()
assert program.count("tpu_custom_call") == 3 and "all-gather" not in program

# Ulysses over seq=4, whose shard_map checks varying axes when compiled.
mesh = make_mesh(seq=4, devices=devices)
x = jax.ShapeDtypeStruct((1, 300, 8, 128), jnp.bfloat16, sharding=NamedSharding(mesh, PartitionSpec(None, "seq")))
ulysses = lambda q, k, v: sequence_parallel_attention(q, k, v, mesh=mesh, strategy="ulysses", impl="splash_tpu")
program = jax.jit(lambda q, k, v: (ulysses(q, k, v), grads(ulysses)(q, k, v))).lower(x, x, x).compile().as_text()
assert program.count("tpu_custom_call") >= 3, program.count("tpu_custom_call")
print("compile ok")
"""


def test_splash_compiles_for_a_real_tpu_topology():
    # A subprocess: libtpu reads its environment when it loads (quiet_libtpu_environment sets it first).
    result = _run(COMPILE_SCRIPT, env={"JAX_PLATFORMS": "cpu"})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "compile ok" in result.stdout
