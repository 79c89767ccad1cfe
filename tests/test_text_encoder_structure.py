"""Structure of the UMT5 encoder: the XXL parameter count, logical axes, the key map, one compile per
batch size for TextEncoder, the cached negative prompt, and the trim-and-zero-pad rule."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from checkpoints_convert import text_encoder_keys
from helios_jax.models.forward import parameter_count
from helios_jax.models.text_encoder import UMT5EncoderModel
from helios_jax.models.text_encoder_config import preset
from helios_jax.text import MAX_LENGTH, TextEncoder, trim_and_zero_pad
from tests.tokenizer_reference import character_tokenizer

BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


def test_umt5_xxl_parameter_count_without_allocating():
    abstract = nnx.eval_shape(lambda: UMT5EncoderModel(preset("umt5_xxl"), rngs=nnx.Rngs(0)))
    assert all(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    # Spec B.5: 5,680,910,336 = embedding 1,050,148,864 + 24 x 192,948,224 + final norm 4,096.
    assert parameter_count(abstract) == 5_680_910_336
    assert parameter_count(abstract.token_embedding) == 1_050_148_864
    assert parameter_count(abstract.blocks) == 24 * 192_948_224
    assert abstract.blocks.attention.relative_attention_bias.shape == (24, 32, 64)  # one table per layer
    assert abstract.token_embedding.embedding.dtype == jnp.bfloat16  # Helios runs the encoder in bf16


def test_every_parameter_has_logical_axes_and_a_transformers_key():
    model = nnx.eval_shape(lambda: UMT5EncoderModel(preset("tiny"), rngs=nnx.Rngs(0)))
    torch_keys = set()
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        name = ".".join(map(str, path))
        axes = var.get_metadata().get("out_sharding")
        assert axes is not None and len(axes) == len(var.shape), name
        stacked = name.startswith("blocks.")
        assert (axes[0] == "layers") == stacked, name
        for layer in range(var.shape[0]) if stacked else (None,):
            key = text_encoder_keys.torch_key_of(name, layer)
            assert text_encoder_keys.target_of(key) == (name, layer, text_encoder_keys.transform_of(name)), key
            torch_keys.add(key)
    # What transformers saves for this config: the token table, 10 tensors per layer, the final norm.
    assert len(torch_keys) == 1 + 10 * 3 + 1 and "shared.weight" in torch_keys


def test_trim_and_zero_pad_keeps_the_first_length_rows():
    hidden = jnp.asarray(np.random.default_rng(0).standard_normal((3, MAX_LENGTH, 8)), jnp.bfloat16) + 0.01
    lengths = np.array([1, 37, MAX_LENGTH])
    mask = (np.arange(MAX_LENGTH)[None] < lengths[:, None]).astype(np.int32)
    out = np.asarray(trim_and_zero_pad(hidden, mask).astype(jnp.float32))
    for row, length in enumerate(lengths):
        np.testing.assert_array_equal(out[row, :length], np.asarray(hidden[row, :length].astype(jnp.float32)))
        assert not out[row, length:].any()


@pytest.fixture(scope="module")
def text_encoder():
    model = UMT5EncoderModel(preset("tiny", vocab_size=128), rngs=nnx.Rngs(0))
    return TextEncoder(model, character_tokenizer())


def test_text_encoder_compiles_once_per_batch_size(text_encoder):
    compiles = []
    listener = lambda event, duration, **kw: compiles.append(event) if event == BACKEND_COMPILE_EVENT else None
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        first = text_encoder.encode(["a red fox", "snow falls on a quiet town"])
        second = text_encoder.encode(["waves at dusk", "a cat"])
        jax.block_until_ready((first, second))
        assert len(compiles) == 1
        text_encoder.encode(["one prompt only"])  # a new batch size compiles again
        assert len(compiles) == 2
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert first.shape == (2, MAX_LENGTH, 64) and first.dtype == jnp.float32
    assert not np.allclose(first, second)


def test_negative_prompt_is_encoded_once_and_reused(text_encoder, monkeypatch):
    calls = []
    encode = text_encoder.encode
    monkeypatch.setattr(text_encoder, "encode", lambda prompts: calls.append(list(prompts)) or encode(prompts))
    embeds, negative = text_encoder.encode_prompt(["a", "b", "c"], "blurry, low quality")
    _, negative_again = text_encoder.encode_prompt(["d", "e", "f"], "blurry, low quality")
    assert calls == [["a", "b", "c"], ["blurry, low quality"], ["d", "e", "f"]]
    assert negative.shape == embeds.shape == (3, MAX_LENGTH, 64)
    np.testing.assert_array_equal(negative, negative_again)
    np.testing.assert_array_equal(negative[0], negative[2])
    _, empty = text_encoder.encode_prompt("a", None)  # a missing negative is "": EOS alone, then zeros
    assert np.asarray(empty[0, 0]).any() and not np.asarray(empty[0, 1:]).any()
    _, none = text_encoder.encode_prompt("a", do_classifier_free_guidance=False)
    assert none is None


def test_float16_and_unknown_fields_are_refused():
    with pytest.raises(ValueError, match="float16 is not supported"):
        preset("tiny", dtype="float16")
    with pytest.raises(ValueError, match="feed_forward_proj"):
        preset("tiny", feed_forward_proj="relu")
    with pytest.raises(ValueError, match="unknown text encoder config field"):
        preset("tiny", d_modle=3)
