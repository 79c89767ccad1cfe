"""Parity of our UMT5 encoder with transformers' UMT5EncoderModel (random weights), of the relative
position buckets with the reference function, and of TextEncoder with the diffusers Helios pipeline's
prompt encoding (spec vae_and_text.md B.9)."""
from functools import partial
from types import SimpleNamespace

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import HeliosPipeline
from transformers import AutoTokenizer
from transformers import UMT5EncoderModel as TorchUMT5Encoder
from transformers.models.umt5.modeling_umt5 import UMT5Attention

import helios_jax
from checkpoints_convert.safetensors_folder import CheckpointError
from helios_jax.models.text_encoder import relative_position_buckets
from helios_jax.text import MAX_LENGTH, PromptTokenizer, TextEncoder
from tests.tokenizer_reference import heliosbench_prompts, write_tokenizer_folder
from tests.transformers_reference import build_reference, convert, padded_batch, relative_error, run_reference

TOLERANCE = 1e-4

# Spec B.3: the bucket of each |key - query| range, for keys before (negative) and after the query.
SPEC_BUCKET_RANGES = [(0, 0, 0), (1, 7, None), (8, 11, 8), (12, 15, 9), (16, 22, 10), (23, 31, 11), (32, 45, 12),
                      (46, 63, 13), (64, 90, 14), (91, 511, 15)]


def test_bucket_table_is_the_spec_table():
    table = relative_position_buckets(512, 512, 32, 128)
    delta_to_bucket = {int(k - q): int(table[q, k]) for q in (0, 511) for k in range(512)}
    assert sorted(delta_to_bucket) == list(range(-511, 512))
    for low, high, bucket in SPEC_BUCKET_RANGES:
        for distance in range(low, high + 1):
            expected = distance if bucket is None else bucket
            assert delta_to_bucket[-distance] == expected, -distance
            if distance:
                assert delta_to_bucket[distance] == expected + 16, distance
    assert 16 not in table  # bucket 16 would be "after, distance 0": never used


@pytest.mark.parametrize("num_buckets, max_distance", [(32, 128), (16, 20), (32, 64), (8, 16)])
def test_buckets_match_transformers(num_buckets, max_distance):
    delta = torch.arange(-1023, 1024)
    config = SimpleNamespace(relative_attention_num_buckets=num_buckets, relative_attention_max_distance=max_distance,
                             is_decoder=False)
    expected = UMT5Attention._relative_position_bucket(config, delta[None, :]).numpy()[0]
    ours = relative_position_buckets(1024, 2047, num_buckets, max_distance)[1023]  # delta = key - 1023
    np.testing.assert_array_equal(ours, expected)


@pytest.fixture(scope="module", params=["tiny", "tiny_narrow"])
def pair(request):
    reference = build_reference(request.param, seed=1)
    return reference, convert(reference)


@pytest.mark.parametrize("lengths", [(37, 300), (1, 512)])
def test_matches_transformers_fp32_with_padding(pair, lengths):
    reference, ours = pair
    ids, mask = padded_batch(reference.config.vocab_size, lengths, MAX_LENGTH, seed=sum(lengths))
    expected = run_reference(reference, ids, mask)
    got = np.asarray(ours(ids, mask))
    assert got.shape == expected.shape == (2, MAX_LENGTH, reference.config.d_model)
    # Every row, padded query rows included (they attend to the real keys only).
    error = relative_error(got, expected)
    print(f"{reference.config.d_model=} {lengths=}: relative error {error:.2e}")
    assert error <= TOLERANCE


def test_no_mask_means_every_token_is_real(pair):
    reference, ours = pair
    ids, _ = padded_batch(reference.config.vocab_size, (20, 20), 20, seed=3)
    expected = run_reference(reference, ids, np.ones_like(ids))
    assert relative_error(np.asarray(ours(ids)), expected) <= TOLERANCE


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A reference encoder saved by transformers, single-file and sharded."""
    reference = build_reference("tiny", seed=2)
    single, sharded = tmp_path_factory.mktemp("single"), tmp_path_factory.mktemp("sharded")
    reference.save_pretrained(single)
    reference.save_pretrained(sharded, max_shard_size="100KB")
    assert len(list(sharded.glob("*.safetensors"))) > 1
    return reference, single, sharded


@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_load_transformers_folder(saved, layout):
    reference, single, sharded = saved
    model = helios_jax.load(single if layout == "single" else sharded, dtype="float32")
    ids, mask = padded_batch(reference.config.vocab_size, (50, 9), 64, seed=4)
    assert relative_error(np.asarray(model(ids, mask)), run_reference(reference, ids, mask)) <= TOLERANCE


def test_bf16_default_and_error_at_most_twice_transformers_bf16(saved):
    reference, single, _ = saved
    ids, mask = padded_batch(reference.config.vocab_size, (120, 33), 128, seed=5)
    exact = run_reference(reference, ids, mask)
    # transformers' bf16 load keeps `wo` in bf16 (its fp32 `wo` is for fp16 only, spec B.4); so do we.
    torch_bf16 = TorchUMT5Encoder.from_pretrained(single, dtype=torch.bfloat16).eval()
    assert torch_bf16.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype == torch.bfloat16
    reference_error = relative_error(run_reference(torch_bf16, ids, mask), exact)
    ours = helios_jax.load(single)  # the text encoder's default dtype is bf16
    assert ours.blocks.feed_forward.wo.kernel.dtype == jnp.bfloat16
    assert ours.token_embedding.embedding.dtype == jnp.bfloat16
    out = ours(ids, mask)
    assert out.dtype == jnp.bfloat16
    our_error = relative_error(np.asarray(out.astype(jnp.float32)), exact)
    print(f"bf16 relative error: ours {our_error:.2e}, transformers {reference_error:.2e}")
    assert 0 < our_error <= 2 * reference_error


def _rewrite(reference, folder, edit):
    from safetensors.numpy import save_file

    folder.mkdir()
    tensors = {k: v.detach().numpy().copy() for k, v in reference.state_dict().items() if k != "encoder.embed_tokens.weight"}
    edit(tensors)
    save_file(tensors, str(folder / "model.safetensors"))
    reference.config.to_json_file(folder / "config.json")
    return folder


def test_token_table_is_the_one_transformers_uses(saved, tmp_path):
    """Tied and unstored (the released checkpoint): `shared.weight`. Stored as well: transformers
    unties the two and its encoder reads `encoder.embed_tokens.weight`, even when it differs."""
    reference, _, _ = saved
    ids, mask = padded_batch(reference.config.vocab_size, (10, 4), 16, seed=6)
    other_table = lambda t: t.update({"encoder.embed_tokens.weight": 0.5 * t["shared.weight"][::-1].copy()})
    for name, edit in (("alias_only", lambda t: t.update({"encoder.embed_tokens.weight": t.pop("shared.weight")})),
                       ("both_differ", other_table)):
        folder = _rewrite(reference, tmp_path / name, edit)
        expected = run_reference(TorchUMT5Encoder.from_pretrained(folder).eval(), ids, mask)
        got = np.asarray(helios_jax.load(folder, dtype="float32")(ids, mask))
        assert relative_error(got, expected) <= TOLERANCE, name
    assert relative_error(expected, run_reference(reference, ids, mask)) > 0.1  # the other table did matter


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda t: t.pop("encoder.block.2.layer.1.DenseReluDense.wo.weight"), "missing 1 parameter.*blocks.feed_forward.wo.kernel"),
        (lambda t: t.pop("shared.weight"), "missing 1 parameter.*token_embedding.embedding"),
        (lambda t: t.update({"encoder.block.0.layer.0.SelfAttention.q.bias": np.zeros(64, np.float32)}), "q.bias"),
        (lambda t: t.update({"encoder.block.3.layer.0.layer_norm.weight": np.ones(64, np.float32)}), "beyond num_layers"),
        (lambda t: t.update({"encoder.final_layer_norm.weight": np.ones(5, np.float32)}), "final_layer_norm.weight has shape"),
    ],
    ids=["missing", "missing_table", "unexpected", "extra_layer", "shape"],
)
def test_broken_folder_is_refused_with_its_name(saved, tmp_path, edit, message):
    reference, _, _ = saved
    folder = _rewrite(reference, tmp_path / "broken", edit)
    with pytest.raises(CheckpointError, match=message):
        helios_jax.load(folder)


def test_float16_is_refused(saved):
    _, single, _ = saved
    with pytest.raises(CheckpointError, match="float16 is not supported"):
        helios_jax.load(single, dtype="float16")


@pytest.fixture(scope="module")
def pipeline_pair(tmp_path_factory):
    """Our TextEncoder and the reference pieces (AutoTokenizer + UMT5EncoderModel) on one random encoder."""
    pytest.importorskip("sentencepiece")
    tokenizer_dir = write_tokenizer_folder(tmp_path_factory.mktemp("text"))
    reference = build_reference("tiny", seed=7, vocab_size=1408)  # covers the tokenizer's 1,300 ids
    ours = TextEncoder(convert(reference), PromptTokenizer.from_folder(tokenizer_dir))
    pipeline = SimpleNamespace(tokenizer=AutoTokenizer.from_pretrained(tokenizer_dir), text_encoder=reference,
                               _execution_device=torch.device("cpu"))
    pipeline._get_t5_prompt_embeds = partial(HeliosPipeline._get_t5_prompt_embeds, pipeline)
    return ours, pipeline


def test_prompt_embeddings_match_the_helios_pipeline(pipeline_pair):
    """The diffusers Helios `encode_prompt` (clean, tokenise, encode, trim, zero-pad) vs ours, with CFG."""
    ours, pipeline = pipeline_pair
    prompts = heliosbench_prompts()[:2] + [" ".join(heliosbench_prompts()[2:8])]  # the last one is truncated
    with torch.no_grad():
        expected, expected_negative = HeliosPipeline.encode_prompt(
            pipeline, prompts, negative_prompt=None, do_classifier_free_guidance=True, max_sequence_length=MAX_LENGTH)
    got, negative = ours.encode_prompt(prompts, negative_prompt=None)
    assert got.shape == tuple(expected.shape) == (3, MAX_LENGTH, 64)
    assert relative_error(np.asarray(got), expected.numpy()) <= TOLERANCE
    assert relative_error(np.asarray(negative), expected_negative.numpy()) <= TOLERANCE
    _, mask = ours.tokenize(prompts)
    lengths = mask.sum(1)
    assert lengths[-1] == MAX_LENGTH and lengths[0] < MAX_LENGTH
    for row, length in enumerate(lengths):
        assert not np.asarray(got[row, length:]).any()  # exact zeros after the true length
        assert np.abs(np.asarray(got[row, :length])).min(axis=-1).max() > 0
    # The empty negative prompt is one EOS row, then zeros.
    assert np.asarray(negative[:, 0]).any() and not np.asarray(negative[:, 1:]).any()
