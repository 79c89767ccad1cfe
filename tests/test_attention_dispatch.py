"""`helios_jax.kernels.dot_product_attention` against torch's scaled_dot_product_attention."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from helios_jax.kernels import dot_product_attention


def _qkv(seed=0, shape=(2, 37, 3, 16)):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape).astype(np.float32) for _ in range(3)]


def _torch_attention(q, k, v):
    t = lambda x: torch.from_numpy(x).transpose(1, 2)  # [B, L, H, D] -> [B, H, L, D]
    return torch.nn.functional.scaled_dot_product_attention(t(q), t(k), t(v)).transpose(1, 2).numpy()


@pytest.mark.parametrize("impl", ["xla", "auto"])
def test_values_and_gradients_match_torch(impl):
    q, k, v = _qkv()
    np.testing.assert_allclose(dot_product_attention(q, k, v, impl=impl), _torch_attention(q, k, v), atol=2e-6)
    tq, tk, tv = (torch.from_numpy(x).requires_grad_() for x in (q, k, v))
    out = torch.nn.functional.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (tq, tk, tv)))
    (out.transpose(1, 2) ** 2).sum().backward()
    grads = jax.grad(lambda q, k, v: jnp.sum(dot_product_attention(q, k, v, impl=impl) ** 2), argnums=(0, 1, 2))(q, k, v)
    for ours, theirs in zip(grads, (tq.grad, tk.grad, tv.grad)):
        np.testing.assert_allclose(ours, theirs.numpy(), atol=2e-5)


def test_cross_attention_lengths():
    q, _, _ = _qkv(1, (1, 20, 2, 8))
    _, k, v = _qkv(2, (1, 7, 2, 8))
    np.testing.assert_allclose(dot_product_attention(q, k, v, impl="xla"), _torch_attention(q, k, v), atol=2e-6)


def test_unknown_or_unavailable_impl_is_a_clear_error():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="one of"):
        dot_product_attention(q, k, v, impl="flash")
    if jax.default_backend() != "gpu":
        with pytest.raises(ValueError, match="needs an NVIDIA GPU"):
            dot_product_attention(q, k, v, impl="cudnn")
