"""LoRA on the transformer: identity at init, merge = unmerged forward, gradients reach exactly the
trained parameters, and the 14B counts of spec training.md §3.5."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helios_jax.models.transformer import HeliosTransformer3DModel
from helios_jax.models.transformer_config import preset
from helios_jax.parallel import logical_axes_of
from helios_jax.training import lora
from helios_jax.training.history_augment import history_model_inputs

BATCH, CHANNELS, HEIGHT, WIDTH, TEXT_LEN = 1, 4, 8, 8, 8


def tiny_inputs(seed=0):
    rng = np.random.default_rng(seed)  # numpy: eager jax.random compiles per shape
    normal = lambda *shape: rng.standard_normal(shape, dtype=np.float32)  # noqa: E731
    x0, history = normal(BATCH, CHANNELS, 1, HEIGHT, WIDTH), normal(BATCH, CHANNELS, 19, HEIGHT, WIDTH)
    return dict(
        hidden_states=normal(BATCH, CHANNELS, 9, HEIGHT, WIDTH),
        timestep=np.full((BATCH,), 500.0, np.float32),
        encoder_hidden_states=normal(BATCH, TEXT_LEN, 16),
        **history_model_inputs(x0, history, jnp.float32),
    )


@nnx.jit
def forward(model, inputs):
    # One compile per model structure: the base and the merged model share one.
    return model(**inputs)


def randomize_lora(model, seed=1, std=0.3):
    """Non-zero A and B everywhere, so every adapter changes the output."""
    state = nnx.state(model, lora.LoRAParam)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    nnx.update(model, jax.tree.unflatten(treedef, [std * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)]))


def paths(state):
    return {".".join(map(str, p)) for p, _ in nnx.to_flat_state(state)}


@pytest.fixture(scope="module")
def inputs():
    return tiny_inputs()


def test_zero_b_at_init_keeps_base_output_and_merge_matches_unmerged(inputs):
    model = HeliosTransformer3DModel(preset("tiny"), rngs=nnx.Rngs(0))
    base = forward(model, inputs)
    lora.add_lora(model, rank=4, alpha=8, patch_embedding="lora", history_patches="lora", rngs=nnx.Rngs(1))
    ups = nnx.state(model, lora.LoRAParam)
    assert all(float(jnp.abs(v[...]).max()) == 0 for p, v in nnx.to_flat_state(ups) if p[-1] == "up")
    downs = [v[...] for p, v in nnx.to_flat_state(ups) if p[-1] == "down"]
    assert all(float(jnp.std(d)) > 0 for d in downs)
    # Equal up to the fp32 rounding of a different fusion (adding an exact zero update).
    np.testing.assert_allclose(np.asarray(forward(model, inputs)), np.asarray(base), atol=2e-6, rtol=0)

    randomize_lora(model, std=0.1)
    adapted = forward(model, inputs)
    assert float(jnp.max(jnp.abs(adapted - base))) > 1e-2  # the adapters do act
    lora.merge_lora(model)
    assert not lora.lora_layers(model) and not jax.tree.leaves(nnx.state(model, lora.LoRAParam))
    scale = float(jnp.max(jnp.abs(adapted)))
    np.testing.assert_allclose(np.asarray(forward(model, inputs)), np.asarray(adapted), atol=1e-5 * scale, rtol=0)


def test_every_dense_and_chosen_patch_layers_get_adapters_with_logical_axes():
    model = HeliosTransformer3DModel(preset("tiny"), rngs=nnx.Rngs(0))
    lora.add_lora(model, rank=4, alpha=4, patch_embedding="lora", history_patches="frozen", rngs=nnx.Rngs(1))
    adapted = {".".join(map(str, p)) for p, _ in lora.lora_layers(model)}
    expected_blocks = {f"blocks.{a}.{n}" for a in ("attn1", "attn2") for n in ("to_q", "to_k", "to_v", "to_out")}
    expected = expected_blocks | {
        "blocks.ffn.linear_in", "blocks.ffn.linear_out", "proj_out", "patch_embedding", "condition_embedder.time_proj",
        *(f"condition_embedder.{e}.linear_{i}" for e in ("time_embedder", "text_embedder") for i in (1, 2)),
    }
    assert adapted == expected
    to_q = model.blocks.attn1.to_q.lora
    assert logical_axes_of(to_q.down) == ("layers", "embed", None)
    assert logical_axes_of(to_q.up) == ("layers", None, "heads")
    assert to_q.down.shape == (2, 24, 4) and to_q.up.shape == (2, 4, 24)
    conv = model.patch_embedding.lora
    assert conv.down.shape == (1, 2, 2, 4, 4) and logical_axes_of(conv.up) == (None, "embed")
    with pytest.raises(ValueError, match="history_patches"):
        lora.add_lora(model, rank=4, alpha=4, history_patches="half", rngs=nnx.Rngs(1))


def test_gradient_reaches_exactly_lora_and_full_history_patchers(inputs):
    model = HeliosTransformer3DModel(preset("tiny"), rngs=nnx.Rngs(0))
    lora.add_lora(model, rank=2, alpha=2, patch_embedding="lora", history_patches="full", rngs=nnx.Rngs(1))
    randomize_lora(model, std=0.1)
    assert all(getattr(model, p).kernel.dtype == jnp.float32 for p in lora.HISTORY_PATCHES)

    @nnx.jit
    def grads(model):
        trainable = nnx.DiffState(0, lora.trainable_filter("full"))
        return nnx.grad(lambda m: jnp.mean(m(**inputs) ** 2), argnums=trainable)(model)

    grad_state = grads(model)
    expected = paths(nnx.state(model, lora.LoRAParam))
    expected |= {f"{p}.{w}" for p in lora.HISTORY_PATCHES for w in ("kernel", "bias")}
    assert paths(grad_state) == expected
    for path, g in nnx.to_flat_state(grad_state):
        assert float(jnp.abs(g[...]).max()) > 0, path


def test_trainable_filter_with_lora_history_patchers_is_the_adapters_only():
    model = nnx.eval_shape(lambda: lora.add_lora(HeliosTransformer3DModel(preset("tiny"), rngs=nnx.Rngs(0)), rank=2,
                                                 alpha=2, history_patches="lora", rngs=nnx.Rngs(1)))
    trainable = paths(nnx.state(model, lora.trainable_filter("lora")))
    assert trainable == paths(nnx.state(model, lora.LoRAParam))
    assert {f"{p}.lora.{f}" for p in lora.HISTORY_PATCHES for f in ("down", "up")} <= trainable
    assert not any(name.startswith("patch_embedding") for name in trainable)  # patch_embedding left frozen


def test_14b_lora_parameter_counts_match_spec_without_allocating():
    rank = 128

    def build():
        model = HeliosTransformer3DModel(preset("helios_14b"), rngs=nnx.Rngs(0))
        return lora.add_lora(model, rank=rank, alpha=rank, patch_embedding="lora", history_patches="full",
                             rngs=nnx.Rngs(1))

    model = nnx.eval_shape(build)
    state = nnx.state(model, lora.LoRAParam)
    assert all(isinstance(v, jax.ShapeDtypeStruct) for v in jax.tree.leaves(state))
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(state))
    assert model.blocks.attn1.to_q.kernel.dtype == jnp.bfloat16
    assert lora.lora_parameter_count(model, "blocks") == 40 * rank * 119_808
    head = sum(lora.lora_parameter_count(model, name) for name in ("condition_embedder", "proj_out"))
    assert head == rank * 76_096
    assert lora.lora_parameter_count(model, "patch_embedding") == rank * (2 * 2 * 16 + 5120)
    trainable = nnx.state(model, lora.trainable_filter("full"))
    total = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(trainable))
    # 623.2M (linears) + 0.66M (patch_embedding LoRA) + 23.94M (full history patchers), spec §3.5.
    assert total == 40 * rank * 119_808 + rank * 76_096 + rank * 5_184 + 23_936_000
    assert round(total / 1e6, 1) == 647.8
