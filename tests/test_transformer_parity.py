"""Parity of our transformer with diffusers' HeliosTransformer3DModel (random weights, fp32)."""
import jax.numpy as jnp
import numpy as np
import pytest

from tests.diffusers_reference import build_reference, convert, relative_error, run_reference

TOLERANCE = 1e-4


def make_inputs(seed=0, batch=1, channels=4, current=(2, 16, 16), short=(1, 16, 16), mid=(1, 16, 16),
                long=(4, 16, 16), text_len=12, text_dim=16, real_text_len=None, timestep=None):
    rng = np.random.default_rng(seed)
    normal = lambda *shape: rng.standard_normal(shape).astype(np.float32)
    text = normal(batch, text_len, text_dim)
    if real_text_len is not None:
        text[:, real_text_len:] = 0.0  # the pipeline zero-pads the prompt embedding
    if timestep is None:
        timestep = rng.uniform(0, 1000, size=(batch,)).astype(np.float32)
    inputs = dict(hidden_states=normal(batch, channels, *current), timestep=timestep, encoder_hidden_states=text)
    # Position indices as the pipeline builds them: prefix 0, long 1..16, mid 17-18, 1x 19, current 20+.
    inputs["indices_hidden_states"] = np.tile(np.arange(20, 20 + current[0]), (batch, 1)) + np.arange(batch)[:, None]
    for name, shape, start in (("short", short, 0), ("mid", mid, 17), ("long", long, 1)):
        if shape is None:
            continue
        inputs[f"latents_history_{name}"] = normal(batch, channels, *shape)
        inputs[f"indices_latents_history_{name}"] = np.tile(np.arange(start, start + shape[0]), (batch, 1))
    return inputs


def run_ours(model, inputs):
    return np.asarray(model(**{k: jnp.asarray(v) for k, v in inputs.items()}))


CASES = {
    # The diffusers unit-test dummy inputs (all indices 1).
    "diffusers_unit_test": dict(),
    "hw_not_multiple_of_4_or_8": dict(current=(3, 18, 22), short=(2, 18, 22), mid=(3, 18, 22), long=(5, 18, 22)),
    "pyramid_stage0_smaller_current": dict(current=(3, 8, 10), short=(2, 16, 20), mid=(2, 16, 20), long=(16, 16, 20)),
    "batch_2": dict(batch=2),
    "integer_timestep": dict(batch=2, timestep=np.array([999, 37], dtype=np.int64)),
    "text_shorter_than_pad_length": dict(text_len=12, real_text_len=5),
    "no_history": dict(short=None, mid=None, long=None),
}


@pytest.fixture(scope="module")
def tiny_pair():
    reference = build_reference(seed=0)
    return reference, convert(reference)


@pytest.mark.parametrize("case", list(CASES))
def test_matches_diffusers_fp32(tiny_pair, case):
    reference, ours = tiny_pair
    inputs = make_inputs(**CASES[case])
    if case == "diffusers_unit_test":
        for key in list(inputs):
            if key.startswith("indices"):
                inputs[key] = np.ones_like(inputs[key])
    expected = run_reference(reference, inputs)
    got = run_ours(ours, inputs)
    assert got.shape == expected.shape
    assert relative_error(got, expected) <= TOLERANCE


@pytest.mark.parametrize(
    "flags",
    [dict(zero_history_timestep=False), dict(guidance_cross_attn=False), dict(cross_attn_norm=False)],
    ids=lambda f: next(iter(f)),
)
def test_matches_diffusers_with_flags_off(flags):
    reference = build_reference(seed=1, **flags)
    inputs = make_inputs(seed=1, batch=2)
    assert relative_error(run_ours(convert(reference), inputs), run_reference(reference, inputs)) <= TOLERANCE


def test_one_dimensional_indices_are_shared_by_the_batch(tiny_pair):
    reference, ours = tiny_pair
    inputs = make_inputs(seed=3, batch=2)
    batched = run_ours(ours, inputs)
    shared = {k: (v[0] if k.startswith("indices") and k != "indices_hidden_states" else v) for k, v in inputs.items()}
    inputs_1d = dict(shared, indices_hidden_states=inputs["indices_hidden_states"][0])
    inputs_2d = dict(inputs, indices_hidden_states=np.tile(inputs["indices_hidden_states"][0], (2, 1)))
    np.testing.assert_allclose(run_ours(ours, inputs_1d), run_ours(ours, inputs_2d), rtol=1e-6, atol=1e-6)
    assert not np.allclose(batched, run_ours(ours, inputs_2d))  # the per-sample indices did matter
