"""Self-tests of the whole-rollout reference harness (tests/pipeline_reference.py). They run the
diffusers pipelines only, never ours: the recorder sees the draws of spec sampler.md §11.1 in order,
replaying them reproduces the run exactly, and the inputs reach diffusers unchanged."""
import numpy as np
import pytest
import torch

from helios_jax.sampling.schedule_tables import from_config_json
from tests import pipeline_reference as ref

H, W = 64, 64  # latents 8x8, pyramid stage 0 is 2x2
FRAMES = 66  # two chunks
VIDEO_FRAMES = 40  # one 33-frame segment, 7 leading frames dropped


@pytest.fixture(scope="module")
def embeds():
    return ref.prompt_embeddings(0, 7), ref.prompt_embeddings(1, 3)


@pytest.fixture(scope="module")
def pipes():
    return {name: ref.build_reference_pipeline(name, seed=0) for name in ref.VARIANTS}


CASES = {
    ("distilled", "t2v"): {},
    ("mid", "t2v"): {},
    ("base", "t2v"): {},
    ("distilled", "i2v"): dict(image=ref.random_pixels((1, 3, H, W), seed=5)),
    ("base", "v2v"): dict(video=ref.random_pixels((1, 3, VIDEO_FRAMES, H, W), seed=6)),
}


@pytest.fixture(scope="module")
def records(pipes, embeds):
    """Each case run once with seed 3: {case: (DrawLog, latents)}."""
    out = {}
    for (variant, task), inputs in CASES.items():
        log = {}
        _, latents = ref.run_reference(variant, pipes[variant], prompt_embeds=embeds[0], negative_prompt_embeds=embeds[1],
                                       num_frames=FRAMES, height=H, width=W, seed=3, log=log, **inputs)
        out[variant, task] = log["draws"], latents
    return out


@pytest.mark.parametrize("case", list(CASES), ids=["-".join(c) for c in CASES])
def test_recorder_sees_the_spec_draws_in_order(records, case):
    variant, task = case
    log, latents = records[case]
    expected = ref.expected_draws(variant, num_frames=FRAMES, height=H, width=W, task=task, video_frames=VIDEO_FRAMES)
    assert log.summary() == expected
    assert all(d.dtype == np.float32 for d in log.draws)
    # rand draws are the noise sigmas' uniforms; randn draws look standard normal
    for kind, d in zip(log.kinds, log.draws):
        if kind == "rand":
            assert (0 <= d).all() and (d < 1).all()
        else:
            assert abs(float(d.std()) - 1) < 0.5
    # real_history_latents: I2V puts the fake-image latent first, V2V the video latents
    conditioning = {"t2v": 0, "i2v": 1, "v2v": 9}[task]
    assert latents.shape == (1, ref.LATENT_CHANNELS, conditioning + 18, H // 8, W // 8)
    assert np.isfinite(latents).all()


@pytest.mark.parametrize("case", list(CASES), ids=["-".join(c) for c in CASES])
def test_replaying_the_draws_reproduces_the_run(pipes, embeds, records, case):
    """A different generator seed with the recorded draws substituted gives the same latents bit for
    bit, so no draw from the generator went unrecorded."""
    variant, _ = case
    log, latents = records[case]
    draws, replayed = ref.run_reference(variant, pipes[variant], prompt_embeds=embeds[0], negative_prompt_embeds=embeds[1],
                                        num_frames=FRAMES, height=H, width=W, seed=12345, replay=log.draws, **CASES[case])
    assert np.array_equal(replayed, latents)
    assert all(np.array_equal(a, b) for a, b in zip(draws, log.draws))


def test_a_different_seed_changes_the_run(pipes, embeds, records):
    """The replay test would be vacuous if the generator did not matter."""
    _, latents = records["distilled", "t2v"]
    _, other = ref.run_reference("distilled", pipes["distilled"], prompt_embeds=embeds[0], num_frames=FRAMES,
                                 height=H, width=W, seed=4)
    assert not np.allclose(other, latents)


def test_replay_refuses_a_wrong_list(pipes, embeds, records):
    log, _ = records["base", "t2v"]
    kwargs = dict(prompt_embeds=embeds[0], negative_prompt_embeds=embeds[1], num_frames=FRAMES, height=H, width=W,
                  num_inference_steps=1)
    with pytest.raises(AssertionError, match="past the end"):
        ref.run_reference("base", pipes["base"], replay=log.draws[:1], **kwargs)
    with pytest.raises(AssertionError, match="shape"):
        ref.run_reference("base", pipes["base"], replay=[d[..., :4] for d in log.draws], **kwargs)


def test_block_noise_uses_the_float64_factor_and_the_block_layout(pipes):
    """With the recorder on, `sample_block_noise` runs on CPU and equals z @ L^T laid out so that
    block entry j = 2*dy + dx fills pixel (2*bi + dy, 2*bj + dx), L the float64 factor (spec §4)."""
    pipe = pipes["mid"]
    b, c, t, h, w = 1, 4, 3, 4, 6
    cholesky = torch.linalg.cholesky
    with ref.record_draws(pipe) as log:
        noise = pipe.sample_block_noise(b, c, t, h, w, (1, 2, 2), torch.device("cpu"), torch.Generator().manual_seed(0))
    assert log.summary() == [("randn", "sample_block_noise", (b * c * t * (h // 2) * (w // 2), 4))]
    factor = ref.block_noise_factor(1 / 3).numpy()
    np.testing.assert_allclose(factor[:, 0], [1, -1 / 3, -1 / 3, -1 / 3], atol=1e-7)
    np.testing.assert_allclose(np.diag(factor), [1, 0.9428090, 0.8164966, 2.0e-4], rtol=1e-4)
    blocks = (log.draws[0] @ factor.T).reshape(b, c, t, h // 2, w // 2, 2, 2)
    expected = blocks.transpose(0, 1, 2, 3, 5, 4, 6).reshape(b, c, t, h, w)
    np.testing.assert_allclose(noise.numpy(), expected, rtol=1e-6, atol=1e-6)
    # outside the recorder the patches are gone
    assert torch.linalg.cholesky is cholesky and "sample_block_noise" not in vars(pipe)


def test_pixels_reach_diffusers_unchanged(pipes):
    """The [0, 1] tensors handed to diffusers come out of its preprocessing as exactly
    `to_signed(pixels)`, the array our pipeline gets."""
    processor = pipes["base"].video_processor
    image = ref.random_pixels((1, 3, H, W), seed=5)
    video = ref.random_pixels((1, 3, 5, H, W), seed=6)
    got = processor.preprocess(ref.reference_image(image), height=H, width=W).numpy()
    assert np.array_equal(got, ref.to_signed(image))
    got = processor.preprocess_video(ref.reference_video(video), height=H, width=W).numpy()
    assert np.array_equal(got, ref.to_signed(video))


@pytest.mark.parametrize("variant", list(ref.VARIANTS))
def test_our_scheduler_reads_the_reference_config(pipes, variant):
    cfg = from_config_json(ref.ours_scheduler_config(pipes[variant]))
    spec = ref.VARIANTS[variant].scheduler_config
    assert cfg.kind == ("dmd" if variant == "distilled" else "unipc")
    assert (cfg.stages, cfg.time_shift_type, cfg.use_dynamic_shifting) == (spec["stages"], spec["time_shift_type"], True)
    assert dict(pipes[variant].config).get("is_distilled", False) == (variant == "distilled")
    assert dict(pipes[variant].config).get("is_cfg_zero_star", False) == (variant == "mid")


def test_ours_converts_the_components(pipes):
    got = ref.ours(pipes["distilled"])
    assert set(got) == {"transformer", "vae", "scheduler_config", "is_cfg_zero_star", "is_distilled"}
    assert (got["is_cfg_zero_star"], got["is_distilled"]) == (False, True)
    assert got["scheduler_config"]["_class_name"] == "HeliosDMDScheduler"
