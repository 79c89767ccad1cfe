"""The chunk rollout's bookkeeping: compiles, noise replay, pyramid resampling against torch, and
the pipeline's argument checks. Whole-rollout numerics are in test_pipeline_parity.py."""
import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx

from helios_jax.models import transformer_config, vae_config
from helios_jax.models.transformer import HeliosTransformer3DModel
from helios_jax.models.vae import AutoencoderKLWan
from helios_jax.sampling.pipeline import HeliosPipeline, check_size
from helios_jax.sampling import pyramid
from helios_jax.sampling.noise import NoiseSource
from helios_jax.sampling.schedulers import HeliosScheduler
from helios_jax.sampling.variants import PIPELINE_FLAGS, SCHEDULER_CONFIGS
from tests.test_transformer_structure import BACKEND_COMPILE_EVENT

EMBEDS = np.random.RandomState(0).randn(1, 512, 16).astype(np.float32)


@pytest.fixture(scope="module")
def components():
    transformer = HeliosTransformer3DModel(transformer_config.preset("tiny"), rngs=nnx.Rngs(0))
    vae = AutoencoderKLWan(vae_config.preset("tiny"), rngs=nnx.Rngs(1))
    return transformer, vae


def pipeline(components, variant):
    transformer, vae = components
    scheduler = HeliosScheduler.from_config_json(SCHEDULER_CONFIGS[variant])
    return HeliosPipeline(transformer, vae, scheduler, **PIPELINE_FLAGS[variant])


def test_four_chunks_compile_the_chunk_program_once_plus_the_amplified_first(components):
    pipe = pipeline(components, "distilled")
    compiles = []
    listener = lambda event, duration, **kw: compiles.append(event) if event == BACKEND_COMPILE_EVENT else None
    per_chunk = []
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        for chunk in pipe.iter_chunks(prompt_embeds=EMBEDS, height=64, width=64, num_frames=4 * 33,
                                      pyramid_num_inference_steps_list=[1, 1, 1], is_amplify_first_chunk=True,
                                      decode=False):
            per_chunk.append(len(compiles))
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert len(per_chunk) == 4
    assert pipe.chunk_compilations == 2  # amplified chunk 0, then one program for chunks 1..3
    assert per_chunk[3] == per_chunk[1], "chunks 2 and 3 compiled something"


def test_one_compile_without_amplification(components):
    pipe = pipeline(components, "mid")
    pipe(prompt_embeds=EMBEDS, negative_prompt_embeds=EMBEDS * 0, height=64, width=64, num_frames=4 * 33,
         pyramid_num_inference_steps_list=[1, 1, 1], output_type="latent")
    assert pipe.chunk_compilations == 1


def test_frames_are_rounded_up_to_chunks_and_trimmed_to_4m_plus_1(components):
    pipe = pipeline(components, "distilled")
    assert [pipe.frame_plan(n).frames_returned for n in (33, 99, 132, 240)] == [33, 97, 129, 261]
    frames = pipe(prompt_embeds=EMBEDS, height=64, width=64, num_frames=40, pyramid_num_inference_steps_list=[1, 1, 1])
    assert frames.shape == (65, 64, 64, 3) and frames.dtype == np.uint8


def test_noise_replay_is_checked(components):
    pipe = pipeline(components, "distilled")
    kwargs = dict(prompt_embeds=EMBEDS, height=64, width=64, num_frames=33, pyramid_num_inference_steps_list=[1, 1, 1],
                  output_type="latent")
    draws = [np.zeros((1, 4, 9, 8, 8)), np.zeros((1 * 4 * 9 * 2 * 2, 4)), np.zeros((1 * 4 * 9 * 4 * 4, 4))]
    out = pipe(**kwargs, noise=draws)
    assert out.shape == (1, 4, 9, 8, 8)
    with pytest.raises(ValueError, match="draw #2"):
        pipe(**kwargs, noise=draws[:2])
    with pytest.raises(ValueError, match=r"draw #0 \(normal\) must have shape \(1, 4, 9, 8, 8\)"):
        pipe(**kwargs, noise=[np.zeros((1, 4, 9, 8, 9))] + draws[1:])
    with pytest.raises(ValueError, match="more arrays"):
        pipe(**kwargs, noise=draws + [np.zeros(1)])


def test_seeded_runs_repeat_and_differ_by_seed():
    a, b = NoiseSource(3), NoiseSource(3)
    assert np.array_equal(a.normal((2, 3)), b.normal((2, 3)))
    assert not np.array_equal(NoiseSource(4).normal((2, 3)), NoiseSource(3).normal((2, 3)))
    u = NoiseSource(0).uniform((1000,))
    assert 0 <= float(u.min()) and float(u.max()) < 1


def test_pyramid_resampling_matches_torch_interpolate():
    x = np.random.RandomState(1).randn(2, 3, 4, 8, 12).astype(np.float32)
    frames = torch.from_numpy(x).permute(0, 2, 1, 3, 4).reshape(8, 3, 8, 12)
    expected = frames
    for size in ((4, 6), (2, 3)):
        expected = F.interpolate(expected, size=size, mode="bilinear") * 2
    expected = expected.reshape(2, 4, 3, 2, 3).permute(0, 2, 1, 3, 4).numpy()
    np.testing.assert_allclose(np.asarray(pyramid.downsample_noise(x, 2)), expected, rtol=1e-6, atol=1e-6)

    up = F.interpolate(frames, size=(16, 24), mode="nearest").reshape(2, 4, 3, 16, 24).permute(0, 2, 1, 3, 4)
    np.testing.assert_array_equal(np.asarray(pyramid.upsample_nearest(x)), up.numpy())


def test_block_noise_matches_diffusers_layout_and_factor():
    from diffusers import HeliosPyramidPipeline

    shape = (1, 2, 3, 4, 6)
    z = torch.randn(pyramid.block_noise_count(shape), 4, generator=torch.Generator().manual_seed(0))
    view = type("View", (), {"scheduler": type("S", (), {"config": type("C", (), {"gamma": 1 / 3})()})()})()
    real_randn, real_cholesky = torch.randn, torch.linalg.cholesky
    torch.randn = lambda *a, **k: z.clone()
    # The reference's fp32 factorisation fails on CPU (spec §4): the same covariance in float64.
    exact = np.eye(4) * (4 / 3) - np.ones((4, 4)) / 3 + np.eye(4) * 1e-8
    torch.linalg.cholesky = lambda cov: torch.from_numpy(np.linalg.cholesky(exact).astype(np.float32))
    try:
        expected = HeliosPyramidPipeline.sample_block_noise(view, *shape, device=torch.device("cpu"),
                                                            generator=torch.Generator())
    finally:
        torch.randn, torch.linalg.cholesky = real_randn, real_cholesky
    factor = pyramid.block_noise_factor(1 / 3)
    np.testing.assert_allclose(factor[0], [1, -1 / 3, -1 / 3, -1 / 3], atol=1e-6)  # L[:, 0], spec §4
    got = pyramid.block_noise(z.numpy(), shape, factor)
    np.testing.assert_allclose(np.asarray(got), expected.numpy(), rtol=1e-6, atol=1e-6)


def test_renoise_coefficients_match_the_spec():
    assert np.allclose(pyramid.renoise_coefficients(0.666333, 1 / 3), (0.6001201, 0.6926122), atol=1e-6)
    assert np.allclose(pyramid.renoise_coefficients(0.333666, 1 / 3), (0.7498129, 0.4333367), atol=1e-6)


@pytest.mark.parametrize("height,width,stages,message", [
    (100, 64, 3, "multiples of 16"),
    (96, 64, 3, "multiples of 64"),
    (0, 64, 1, "positive"),
])
def test_bad_sizes_are_refused(height, width, stages, message):
    with pytest.raises(ValueError, match=message):
        check_size(height, width, stages)


def test_bad_arguments_are_refused_before_compiling(components):
    pipe = pipeline(components, "base")
    with pytest.raises(ValueError, match="num_frames must be positive"):
        pipe(prompt_embeds=EMBEDS, negative_prompt_embeds=EMBEDS, num_frames=0, height=64, width=64)
    with pytest.raises(ValueError, match="negative_prompt_embeds"):
        pipe(prompt_embeds=EMBEDS, num_frames=33, height=64, width=64)  # CFG without a negative, no encoder
    with pytest.raises(ValueError, match="not both"):
        pipe(prompt="a", prompt_embeds=EMBEDS)
    assert pipe.chunk_compilations == 0


def test_interactive_prompts_switch_per_chunk_without_recompiling(components):
    """Two prompts of 4 chunks each, blended over 3 chunks (spec §7): too few frames asked, so the
    chunk count becomes the sum of the cumulative ends (4 + 8 = 12), and the prompt changes never
    change the compiled program."""
    from helios_jax.sampling.pipeline import _interpolation

    embeds = np.stack([EMBEDS[0], -EMBEDS[0]])
    num_chunks, chunk_prompt = _interpolation(embeds, 1, [4, 4], 3)
    assert num_chunks == 12
    np.testing.assert_array_equal(chunk_prompt(4)[0], embeds[0])  # first chunk of the new prompt: weight 0
    np.testing.assert_allclose(chunk_prompt(5)[0], 0 * embeds[0], atol=1e-6)  # 50/50 blend of opposite prompts
    np.testing.assert_array_equal(chunk_prompt(6)[0], embeds[1])
    np.testing.assert_array_equal(chunk_prompt(8)[0], embeds[0])  # past the last interval: back to P_0 (quirk)

    pipe = pipeline(components, "distilled")
    chunks = list(pipe.iter_chunks(prompt_embeds=embeds, use_interpolate_prompt=True, interpolate_time_list=[4, 4],
                                   height=64, width=64, num_frames=33, pyramid_num_inference_steps_list=[1, 1, 1],
                                   is_amplify_first_chunk=False, decode=False))
    assert len(chunks) == 12 and pipe.chunk_compilations == 1
