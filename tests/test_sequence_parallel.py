"""Sequence-parallel self-attention on 8 CPU devices: Ulysses and the ring fallback give plain
attention's values and gradients, and the tiny transformer under a mesh that shards `seq` gives
its unsharded output. Subprocesses, because the device count must be set before jax starts."""
import subprocess
import sys
import textwrap

PRELUDE = """
import os
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"
import jax
import jax.numpy as jnp
import numpy as np

from helios_jax.kernels import dot_product_attention, sequence_parallel_attention
from helios_jax.parallel import make_mesh


def relative_error(ours, reference):
    return float(jnp.abs(ours - reference).max() / jnp.abs(reference).max())
"""

KERNEL_SCRIPT = PRELUDE + """
# (mesh, q/k/v shape [B, L, H, D], strategy, collective that must appear in the program)
CASES = [
    (dict(seq=8), (1, 32, 8, 16), "auto", "all-to-all"),            # Ulysses, H divides
    (dict(data=2, seq=4), (2, 30, 4, 8), "auto", "all-to-all"),     # + batch over data, L padded
    (dict(tensor=2, seq=4), (2, 20, 8, 8), "auto", "all-to-all"),   # + heads over tensor
    (dict(seq=4), (1, 24, 3, 8), "auto", "collective-permute"),     # ring: 3 heads over 4
    (dict(fsdp=2, seq=4), (2, 21, 3, 8), "ring", "collective-permute"),  # ring, L padded
]


def loss(attention):
    return lambda q, k, v: jnp.sum(jnp.sin(attention(q, k, v)))


for mesh_sizes, shape, strategy, collective in CASES:
    mesh = make_mesh(**mesh_sizes)
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal(shape), jnp.float32) for _ in range(3))
    parallel = lambda q, k, v: sequence_parallel_attention(q, k, v, mesh=mesh, strategy=strategy)
    plain = lambda q, k, v: dot_product_attention(q, k, v, impl="xla")
    compiled = jax.jit(parallel).lower(q, k, v).compile()  # compiled once, inspected and run
    assert collective in compiled.as_text(), (mesh_sizes, shape, collective)
    value_error = relative_error(compiled(q, k, v), plain(q, k, v))
    ours = jax.jit(jax.grad(loss(parallel), argnums=(0, 1, 2)))(q, k, v)
    theirs = jax.grad(loss(plain), argnums=(0, 1, 2))(q, k, v)
    grad_error = max(relative_error(a, b) for a, b in zip(ours, theirs))
    print(f"{mesh_sizes} {shape} {strategy}: value {value_error:.2e} grad {grad_error:.2e}")
    assert value_error <= 1e-5 and grad_error <= 1e-5, (mesh_sizes, shape, value_error, grad_error)

try:
    sequence_parallel_attention(q, k, v, mesh=make_mesh(seq=4), strategy="ulysses")
    raise AssertionError("Ulysses with 3 heads over seq=4 must be refused")
except ValueError as error:
    assert "ring" in str(error)
print("kernels ok")
"""

MODEL_SCRIPT = PRELUDE + """
from flax import nnx

from helios_jax.models.example_inputs import example_inputs, token_counts
from helios_jax.models.transformer import HeliosTransformer3DModel
from helios_jax.models.transformer_config import preset

config = preset("tiny")  # 2 heads: seq=4 takes the ring, seq=2 Ulysses
model = HeliosTransformer3DModel(config, rngs=nnx.Rngs(0))
latent_size = (2, 8, 12)
history, current = token_counts(config, latent_size)
assert (history + current) % 4, "the token count should not divide seq=4 (exercises the padding)"
graphdef, state = nnx.split(model)


@jax.jit
def forward(state, inputs):
    return nnx.merge(graphdef, state)(**inputs)


inputs = example_inputs(config, latent_size, batch=2, text_len=16, real_text_len=5)
unsharded = forward(state, inputs)
for mesh_sizes, collective in ((dict(seq=4), "collective-permute"), (dict(data=2, seq=2), "all-to-all")):
    with jax.set_mesh(make_mesh(**mesh_sizes)):
        compiled = forward.lower(state, inputs).compile()  # compiled once, inspected and run
        sharded = compiled(state, inputs)
    assert collective in compiled.as_text(), (mesh_sizes, collective)
    error = relative_error(sharded, unsharded)
    print(f"transformer {mesh_sizes}: {history}+{current} tokens, error {error:.2e}")
    assert error <= 1e-5, (mesh_sizes, error)
print("model ok")
"""


def _run(script: str, marker: str):
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert marker in result.stdout


def test_ulysses_and_ring_match_plain_attention_values_and_gradients():
    _run(KERNEL_SCRIPT, "kernels ok")


def test_tiny_transformer_on_a_seq_mesh_matches_unsharded():
    _run(MODEL_SCRIPT, "model ok")
