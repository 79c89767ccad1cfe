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


def test_autotune_picks_the_fastest_candidate_once_and_skips_failures(monkeypatch):
    """`auto` times each supported candidate once per shape (eagerly, even while a jit traces)
    and drops one that fails; without measuring it takes the first supported preference."""
    import time

    from helios_jax.kernels import autotune

    monkeypatch.setattr(autotune, "_chosen", {})
    monkeypatch.setitem(autotune.PREFERENCE, "fake", ("broken", "slow", "fast", "unsupported"))
    calls = []

    def run(impl, qkv):
        calls.append(impl)
        if impl == "broken":
            raise RuntimeError("does not compile here")
        if impl == "slow":
            time.sleep(0.01)
        return qkv[0] * 2

    supported = lambda impl: impl != "unsupported"  # noqa: E731
    choose = lambda shape: autotune.choose(shape, shape, jnp.float32, supported=supported, run=run,  # noqa: E731
                                           backend="fake", measure=True)
    assert jax.jit(lambda x: x + len(choose(x.shape)))(jnp.zeros((1, 4, 2, 8))).shape == (1, 4, 2, 8)
    assert autotune.chosen() == {("fake", (1, 4, 2, 8), (1, 4, 2, 8), "float32"): "fast"}
    assert set(calls) == {"broken", "slow", "fast"}
    calls.clear()
    assert choose((1, 4, 2, 8)) == "fast" and not calls  # remembered: no second measurement
    assert autotune.choose((1, 4, 2, 8), (1, 4, 2, 8), jnp.float32, supported=supported, run=run,
                           backend="fake", measure=False) == "broken"
    monkeypatch.setenv("HELIOS_ATTENTION_AUTOTUNE", "0")
    assert not autotune.autotune_enabled()


def test_auto_on_cpu_is_xla_and_supports_reports_the_native_backends():
    from helios_jax.kernels import dispatch

    q = jnp.zeros((1, 8, 2, 128), jnp.bfloat16)
    assert dispatch.supports("cudnn", q, backend="gpu") and not dispatch.supports("cudnn", q.astype(jnp.float32), backend="gpu")
    assert dispatch.supports("pallas_tpu", q, backend="tpu") and not dispatch.supports("pallas_tpu", q, backend="gpu")
    assert dispatch.supports("pallas_gpu", q, backend="gpu") and not dispatch.supports("pallas_gpu", q, backend="cpu")
    if jax.default_backend() == "cpu":
        assert dispatch._auto_impl(q, q) == "xla"
