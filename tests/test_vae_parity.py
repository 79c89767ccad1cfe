"""fp32 parity of our Wan2.1 VAE against diffusers' `AutoencoderKLWan` (random weights, perturbed
gammas and biases): posterior mean and logvar of encode, frames of decode, and decoding in pieces."""
import functools

import numpy as np
import pytest
import torch

from tests.diffusers_reference import relative_error
from tests.vae_reference import (
    TINY_CONFIGS,
    WAN21,
    build_reference,
    convert,
    random_video,
    reference_decode,
    reference_encode,
)

TOLERANCE = 1e-4


CONFIGS = {**TINY_CONFIGS, "wan21": WAN21}


@functools.cache
def pair(name: str):
    """The reference for one config and our conversion of it (built once per test session)."""
    reference = build_reference(seed=len(name), **CONFIGS[name])
    return reference, convert(reference)


def latents_like(reference, frames: int, height: int, width: int, seed: int = 1) -> np.ndarray:
    shape = (1, reference.config.z_dim, frames, height, width)
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def assert_decode_matches(ours, reference, latents):
    expected = reference_decode(reference, latents)
    got = np.asarray(ours.decode(latents))
    assert got.shape == expected.shape
    # The output is clamped to [-1, 1]: make sure most of it is not, or the comparison says little.
    assert np.mean(np.abs(expected) < 0.999) > 0.5
    assert relative_error(got, expected) <= TOLERANCE


# A single image, 1 + 4k frames, and 7 frames (diffusers drops the trailing 2). The full-width
# Wan2.1 architecture runs once, on 9 frames of 32x48 (it is slow on two CPU cores).
ENCODE_CASES = [(name, frames) for name in TINY_CONFIGS for frames in (1, 9)] + [("minimal_3d", 7), ("wan21", 9)]
# Latent frames at the latent size of 32x48 pixels.
DECODE_CASES = [(name, frames) for name in TINY_CONFIGS for frames in (1, 3)] + [("wan21", 3)]


@pytest.mark.parametrize("name, frames", ENCODE_CASES)
def test_encode_mean_and_logvar(name, frames):
    reference, ours = pair(name)
    video = random_video(frames, 32, 48, seed=frames)
    mean, logvar = reference_encode(reference, video)
    posterior = ours.encode_posterior(video)
    assert posterior.mean.shape == mean.shape
    assert relative_error(np.asarray(posterior.mean), mean) <= TOLERANCE
    assert relative_error(np.asarray(posterior.logvar), logvar) <= TOLERANCE
    np.testing.assert_array_equal(np.asarray(ours.encode(video)), np.asarray(posterior.mean))


@pytest.mark.parametrize("name, latent_frames", DECODE_CASES)
def test_decode(name, latent_frames):
    reference, ours = pair(name)
    stride = 2 ** (len(reference.config.dim_mult) - 1)
    assert_decode_matches(ours, reference, latents_like(reference, latent_frames, 32 // stride, 48 // stride))


def test_decode_chunk_in_pieces_equals_reference_decode():
    """A 9-latent chunk decoded as 1 + 4 + 4 latents, the cache carried between the pieces, gives
    the reference's 33 frames; both continuation pieces run the same compiled program."""
    reference, ours = pair("wan_structure")
    latents = latents_like(reference, 9, 4, 6, seed=7)
    expected = reference_decode(reference, latents)
    first, cache = ours.decode_start(latents[:, :, :1])
    middle, cache = ours.decode_continue(latents[:, :, 1:5], cache)
    last, _ = ours.decode_continue(latents[:, :, 5:], cache)
    assert [p.shape[2] for p in (first, middle, last)] == [1, 16, 16]
    got = np.concatenate([first, middle, last], axis=2)
    assert got.shape == expected.shape == (1, 3, 33, 32, 48)
    assert relative_error(got, expected) <= TOLERANCE


def test_posterior_sample_replays_the_reference_draw():
    reference = build_reference(seed=5, **TINY_CONFIGS["minimal_3d"])
    ours = convert(reference)
    video = random_video(5, 16, 16, seed=2)
    with torch.no_grad():
        expected = reference.encode(torch.from_numpy(video)).latent_dist.sample(torch.Generator().manual_seed(11))
    posterior = ours.encode_posterior(video)
    noise = torch.randn(posterior.mean.shape, generator=torch.Generator().manual_seed(11)).numpy()
    got = np.asarray(posterior.sample(noise=noise))
    assert relative_error(got, expected.numpy()) <= TOLERANCE
    with pytest.raises(ValueError, match="exactly one of key= or noise="):
        posterior.sample()
