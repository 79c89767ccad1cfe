"""I2V and V2V conditioning latents against diffusers' Helios pipeline (its prepare_image_latents /
prepare_video_latents run on the reference VAE), replaying the pipeline's posterior draws."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import HeliosPipeline

from helios_jax.sampling.conditioning import image_condition, video_condition
from tests.diffusers_reference import relative_error
from tests.vae_reference import TINY_CONFIGS, build_reference, convert, random_video

STATS = dict(latents_mean=[0.3, -0.2, 0.5, 0.1], latents_std=[1.5, 0.7, 2.0, 1.1])


@pytest.fixture(scope="module")
def vaes():
    reference = build_reference(seed=2, **TINY_CONFIGS["wan_structure"], **STATS)
    return reference, convert(reference)


def pipeline_view(reference):
    """The attributes of a HeliosPipeline that its latent-preparation methods read."""
    pipe = SimpleNamespace(vae=reference, vae_scale_factor_temporal=4, _execution_device=torch.device("cpu"))
    mean = torch.tensor(reference.config.latents_mean).view(1, 4, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(reference.config.latents_std).view(1, 4, 1, 1, 1)
    return pipe, mean, inv_std


def torch_draws(seed):
    generator = torch.Generator().manual_seed(seed)
    return lambda shape: torch.randn(shape, generator=generator).numpy()


def test_image_condition_matches_pipeline(vaes):
    reference, ours = vaes
    image = random_video(1, 32, 48, seed=4)[:, :, 0]
    pipe, mean, inv_std = pipeline_view(reference)
    with torch.no_grad():
        expected = HeliosPipeline.prepare_image_latents(
            pipe, torch.from_numpy(image), mean, inv_std, 9, generator=torch.Generator().manual_seed(8)
        )
    got = image_condition(ours, image, torch_draws(8))
    for mine, theirs in zip(got, expected):
        assert mine.shape == theirs.shape == (1, 4, 1, 4, 6)
        assert relative_error(np.asarray(mine), theirs.numpy()) <= 1e-4


def test_video_condition_matches_pipeline(vaes):
    reference, ours = vaes
    video = random_video(70, 32, 48, seed=5)  # two whole chunks after dropping the first 4 frames
    pipe, mean, inv_std = pipeline_view(reference)
    with torch.no_grad():
        expected = HeliosPipeline.prepare_video_latents(
            pipe, torch.from_numpy(video), mean, inv_std, 9, generator=torch.Generator().manual_seed(9)
        )
    got = video_condition(ours, video, torch_draws(9))
    assert [g.shape for g in got] == [(1, 4, 1, 4, 6), (1, 4, 18, 4, 6)]
    for mine, theirs in zip(got, expected):
        assert relative_error(np.asarray(mine), theirs.numpy()) <= 1e-4


def test_too_short_video_is_refused(vaes):
    _, ours = vaes
    with pytest.raises(ValueError, match="at least 33 frames"):
        video_condition(ours, random_video(20, 32, 48), torch_draws(0))
