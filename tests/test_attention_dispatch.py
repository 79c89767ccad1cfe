"""`helios_jax.kernels.dot_product_attention` against torch's scaled_dot_product_attention; `auto` (autotune,
its logs and fallbacks) and HELIOS_ATTENTION_IMPL."""
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
    assert dispatch.supports("splash_tpu", q, backend="tpu") and not dispatch.supports("splash_tpu", q, backend="gpu")
    if jax.default_backend() == "cpu":
        assert dispatch._auto_impl(q, q) == "xla"


def _fake_backend(monkeypatch, preference):
    """A backend "fake" whose candidates are `preference`, nothing measured yet."""
    from helios_jax.kernels import autotune

    monkeypatch.setattr(autotune, "_chosen", {})
    monkeypatch.setitem(autotune.PREFERENCE, "fake", preference)
    return lambda run, shape=(1, 4, 2, 8): autotune.choose(shape, shape, jnp.float32, supported=lambda impl: True,
                                                           run=run, backend="fake", measure=True)


def _out_of_memory(impl):
    return jax.errors.JaxRuntimeError(f"RESOURCE_EXHAUSTED: Out of memory while running {impl}\nallocation details")


def test_autotune_drops_a_candidate_that_runs_out_of_memory_and_says_so(monkeypatch, capsys):
    choose = _fake_backend(monkeypatch, ("splash_tpu", "pallas_tpu", "xla"))

    def run(impl, qkv):
        if impl == "splash_tpu":
            raise _out_of_memory(impl)
        return qkv[0] * 2

    assert choose(run) in ("pallas_tpu", "xla")
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == ("attention autotune [fake q(1, 4, 2, 8) k(1, 4, 2, 8) float32]: dropped splash_tpu: "
                        "JaxRuntimeError: RESOURCE_EXHAUSTED: Out of memory while running splash_tpu")
    assert "chose" in lines[1] and "pallas_tpu" in lines[1] and " ms" in lines[1] and "splash_tpu" not in lines[1]
    assert len(lines) == 2
    choose(run)
    assert capsys.readouterr().err == ""  # once per shape


def test_autotune_falls_back_to_xla_with_a_warning_when_every_kernel_fails(monkeypatch, capsys):
    choose = _fake_backend(monkeypatch, ("splash_tpu", "pallas_tpu"))

    def run(impl, qkv):
        raise _out_of_memory(impl) if impl == "splash_tpu" else ValueError("Mosaic rejects the block")

    assert choose(run) == "xla"
    warning = capsys.readouterr().err.splitlines()[-1]
    assert warning.startswith("WARNING: attention autotune [fake q(1, 4, 2, 8)")
    assert "splash_tpu: JaxRuntimeError: RESOURCE_EXHAUSTED" in warning
    assert "pallas_tpu: ValueError: Mosaic rejects the block" in warning and "falling back to xla" in warning


def test_autotune_raises_when_xla_fails_too(monkeypatch):
    choose = _fake_backend(monkeypatch, ("pallas_tpu", "xla"))

    def run(impl, qkv):
        raise _out_of_memory(impl)

    with pytest.raises(RuntimeError, match=r"every candidate failed, xla included .*xla: JaxRuntimeError"):
        choose(run)


def test_unmeasured_auto_on_a_tpu_prefers_splash():
    from helios_jax.kernels import autotune, dispatch

    q = jnp.zeros((1, 8, 2, 128), jnp.bfloat16)
    never = lambda impl, qkv: pytest.fail("nothing is measured")  # noqa: E731
    assert autotune.choose(q.shape, q.shape, q.dtype, supported=lambda impl: dispatch.supports(impl, q, backend="tpu"),
                           run=never, backend="tpu", measure=False) == "splash_tpu"
    assert dispatch.supports("splash_tpu", q, backend="tpu") and not dispatch.supports("splash_tpu", q, backend="cpu")
    assert not dispatch.supports("splash_tpu", q[..., :64], backend="tpu")


def test_helios_attention_impl_forces_and_is_validated(monkeypatch):
    from helios_jax.kernels import dispatch

    assert dispatch.forced_impl({}) is None and dispatch.forced_impl({"HELIOS_ATTENTION_IMPL": "auto"}) is None
    assert dispatch.forced_impl({"HELIOS_ATTENTION_IMPL": "splash_tpu"}, backend="tpu") == "splash_tpu"
    assert dispatch.forced_impl({"HELIOS_ATTENTION_IMPL": "xla"}, backend="gpu") == "xla"
    with pytest.raises(ValueError, match=r"HELIOS_ATTENTION_IMPL must be one of xla, .*splash_tpu.*'flash'"):
        dispatch.forced_impl({"HELIOS_ATTENTION_IMPL": "flash"})
    with pytest.raises(ValueError, match=r"HELIOS_ATTENTION_IMPL=splash_tpu is not supported on this backend \(cpu\)"):
        dispatch.forced_impl({"HELIOS_ATTENTION_IMPL": "splash_tpu"}, backend="cpu")

    # impl="auto" takes the forced one without measuring; an explicit impl is left alone.
    monkeypatch.setattr(dispatch, "_auto_impl", lambda q, k: pytest.fail("auto measured despite the variable"))
    monkeypatch.setenv("HELIOS_ATTENTION_IMPL", "xla")
    q, k, v = _qkv()
    np.testing.assert_allclose(dot_product_attention(q, k, v), _torch_attention(q, k, v), atol=2e-6)
    if jax.default_backend() == "cpu":
        monkeypatch.setenv("HELIOS_ATTENTION_IMPL", "pallas_tpu")
        with pytest.raises(ValueError, match="not supported on this backend"):
            dot_product_attention(q, k, v)
        np.testing.assert_allclose(dot_product_attention(q, k, v, impl="xla"), _torch_attention(q, k, v), atol=2e-6)
