"""Structure of the transformer: parameter count, logical axes, one compile per shape, remat."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helios_jax.models.example_inputs import example_inputs
from helios_jax.models.forward import make_forward, parameter_count
from helios_jax.models.transformer import HeliosTransformer3DModel
from helios_jax.models.transformer_config import preset

BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


def test_14b_parameter_count_without_allocating():
    abstract = nnx.eval_shape(lambda: HeliosTransformer3DModel(preset("helios_14b"), rngs=nnx.Rngs(0)))
    leaves = jax.tree.leaves(nnx.state(abstract, nnx.Param))
    assert all(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in leaves)
    assert parameter_count(abstract) == 14_312_427_584


def test_every_parameter_has_logical_axes_and_fp32_islands():
    model = nnx.eval_shape(lambda: HeliosTransformer3DModel(preset("tiny", dtype="bfloat16"), rngs=nnx.Rngs(0)))
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        name = ".".join(map(str, path))
        axes = var.get_metadata().get("out_sharding")
        assert axes is not None and len(axes) == len(var.shape), name
        assert (axes[0] == "layers") == (name.startswith("blocks.")), name
        fp32 = "time_embedder" in name or "scale_shift_table" in name or "norm2" in name
        assert var.dtype == (jnp.float32 if fp32 else jnp.bfloat16), name


def test_jitted_forward_compiles_once_for_two_calls():
    model = HeliosTransformer3DModel(preset("tiny"), rngs=nnx.Rngs(0))
    forward, state = make_forward(model)
    inputs = [example_inputs(model.config, size, seed=seed) for size, seed in (((9, 16, 16), 0), ((9, 16, 16), 1), ((9, 16, 24), 1))]
    compiles = []
    listener = lambda event, duration, **kw: compiles.append(event) if event == BACKEND_COMPILE_EVENT else None
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        first = forward(state, **inputs[0])
        second = forward(state, **inputs[1])
        jax.block_until_ready((first, second))
        assert len(compiles) == 1
        forward(state, **inputs[2])  # a new shape compiles again
        assert len(compiles) == 2
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert not np.allclose(first, second)


@pytest.mark.parametrize("policy", ["full", "dots"])
def test_remat_policy_keeps_values_and_gradients(policy):
    config = preset("tiny")
    inputs = example_inputs(config, (3, 8, 8), text_len=8, real_text_len=4)
    models = [HeliosTransformer3DModel(c, rngs=nnx.Rngs(0)) for c in (config, preset("tiny", remat_policy=policy))]

    def loss(model):
        return jnp.mean(model(**inputs) ** 2)

    (value_a, grads_a), (value_b, grads_b) = (nnx.value_and_grad(loss)(m) for m in models)
    np.testing.assert_allclose(value_a, value_b, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b)):
        assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max()


@pytest.mark.parametrize(
    "dropped, message",
    [
        ("indices_latents_history_mid", "latents_history_mid needs indices_latents_history_mid"),
        ("latents_history_long", "indices_latents_history_long needs latents_history_long"),
    ],
)
def test_history_arguments_must_come_in_pairs(dropped, message):
    model = HeliosTransformer3DModel(preset("tiny"), rngs=nnx.Rngs(0))
    inputs = example_inputs(model.config, (2, 8, 8), text_len=4)
    del inputs[dropped]
    with pytest.raises(ValueError, match=message):
        model(**inputs)


def test_module_works_under_nnx_jit():
    model = HeliosTransformer3DModel(preset("tiny"), rngs=nnx.Rngs(0))
    inputs = example_inputs(model.config, (2, 8, 8), text_len=8)
    jitted = nnx.jit(lambda model, inputs: model(**inputs))(model, inputs)
    np.testing.assert_allclose(jitted, model(**inputs), rtol=1e-5, atol=1e-6)

