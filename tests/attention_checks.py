"""What the attention-kernel tests share: random q/k/v, the XLA reference, and one jitted program
for a kernel's output and its gradients."""
import jax
import jax.numpy as jnp
import numpy as np


def qkv(q_len, kv_len, *, batch=1, heads=2, head_dim=128, dtype="float32", seed=0):
    rng = np.random.default_rng(seed)
    make = lambda length: jnp.asarray(rng.standard_normal((batch, length, heads, head_dim)), dtype)  # noqa: E731
    return make(q_len), make(kv_len), make(kv_len)


def relative_error(ours, reference) -> float:
    ours, reference = (jnp.asarray(x, jnp.float32) for x in (ours, reference))
    return float(jnp.abs(ours - reference).max() / jnp.abs(reference).max())


def value_and_grads(attention):
    """One jitted program: the output and dq, dk, dv of sum(sin(out)) (each output element gets
    its own cotangent, cos(out)). One compile per case keeps the interpreter's cost down."""
    def run(q, k, v):
        out, pullback = jax.vjp(attention, q, k, v)
        return out, pullback(jnp.cos(out.astype(jnp.float32)).astype(out.dtype))
    return jax.jit(run)


def xla_attention(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, implementation="xla")
