"""Whole-rollout parity of our HeliosPipeline against diffusers' HeliosPipeline (Base) and
HeliosPyramidPipeline (Mid, Distilled), with tiny random components in float32.

Each case generates two chunks (66 frames). The reference runs first with its draws recorded
(tests/pipeline_reference.py); ours gets the same components (converted), the same embeddings and
pixels, and the recorded draws through `noise=`, so both sample the same trajectory and the final
latents (diffusers' real_history_latents: conditioning latents, then every chunk) must agree.

The size is 64x128 (latents 8x16): pyramid stage 0 is 2x4 latents, and a non-square frame catches a
swapped height and width.
"""
import numpy as np
import pytest

from helios_jax.sampling.pipeline import HeliosPipeline
from helios_jax.sampling.schedulers import HeliosScheduler
from tests import pipeline_reference as ref
from tests.diffusers_reference import relative_error

H, W = 64, 128
FRAMES = 66  # two chunks of 33 frames
VIDEO_FRAMES = 40  # one 33-frame segment for V2V, after dropping the first 7 frames
TOLERANCE = 1e-3

IMAGE = ref.random_pixels((1, 3, H, W), seed=5)  # [0, 1]; both sides see 2x - 1
VIDEO = ref.random_pixels((1, 3, VIDEO_FRAMES, H, W), seed=6)
PROMPT = ref.prompt_embeddings(0, 7)  # [1, 512, 16], zero after 7 tokens
NEGATIVE = ref.prompt_embeddings(1, 3)


class Pair:
    """A variant's reference pipeline and ours, built from the same random components."""

    def __init__(self, variant: str):
        self.variant = variant
        self.reference = ref.build_reference_pipeline(variant, seed=0)
        components = ref.ours(self.reference)
        self.ours = HeliosPipeline(
            transformer=components["transformer"],
            vae=components["vae"],
            scheduler=HeliosScheduler.from_config_json(components["scheduler_config"]),
            text_encoder=None,
            is_cfg_zero_star=components["is_cfg_zero_star"],
            is_distilled=components["is_distilled"],
        )

    def run(self, task: str, seed: int, frames: int = FRAMES, **extra):
        settings = {**ref.VARIANTS[self.variant].call, **extra}
        negative = NEGATIVE if settings["guidance_scale"] > 1 else None
        draws, expected = ref.run_reference(
            self.variant, self.reference, prompt_embeds=PROMPT, negative_prompt_embeds=negative,
            num_frames=frames, height=H, width=W, seed=seed,
            image=IMAGE if task == "i2v" else None, video=VIDEO if task == "v2v" else None, **settings)
        got = self.ours(
            prompt_embeds=PROMPT, negative_prompt_embeds=negative, height=H, width=W, num_frames=frames,
            image=ref.to_signed(IMAGE) if task == "i2v" else None,
            video=ref.to_signed(VIDEO) if task == "v2v" else None,
            noise=list(draws), output_type="latent", **settings)
        return np.asarray(got), expected


@pytest.fixture(scope="module")
def pairs():
    built = {}

    def get(variant):
        if variant not in built:
            built[variant] = Pair(variant)
        return built[variant]

    return get


CASES = [
    ("distilled", "t2v"),  # DMD [2, 2, 2], first chunk amplified to [4, 4, 4]
    ("mid", "t2v"),  # UniPC [2, 2, 2], CFG-Zero* 5.0, zero-init of the first two stage-0 steps
    ("base", "t2v"),  # UniPC 4 steps, CFG 5.0
    ("distilled", "i2v"),
    ("distilled", "v2v"),
    ("base", "i2v"),
    ("base", "v2v"),
]
# Mid's I2V / V2V are left out for runtime (each costs two 33-frame VAE encodes on the reference
# side): conditioning and history seeding do not depend on the variant, and what is Mid's own
# (UniPC in the pyramid, CFG-Zero*, zero-init) is covered by its T2V case.


@pytest.mark.parametrize("variant,task", CASES, ids=[f"{v}-{t}" for v, t in CASES])
def test_rollout_matches_diffusers(pairs, variant, task):
    got, expected = pairs(variant).run(task, seed=11)
    conditioning = {"t2v": 0, "i2v": 1, "v2v": 9}[task]
    assert expected.shape == (1, ref.LATENT_CHANNELS, conditioning + 18, H // 8, W // 8)
    assert got.shape == expected.shape
    per_chunk = [relative_error(got[:, :, s:s + 9], expected[:, :, s:s + 9]) for s in range(conditioning, conditioning + 18, 9)]
    if conditioning:
        per_chunk.insert(0, relative_error(got[:, :, :conditioning], expected[:, :, :conditioning]))
    assert relative_error(got, expected) <= TOLERANCE, f"relative error per block (conditioning, chunks): {per_chunk}"


def test_skip_first_chunk_takes_the_anchor_from_chunk_1(pairs):
    """Three chunks: with is_skip_first_chunk the third chunk's anchor is frame 0 of the second."""
    got, expected = pairs("distilled").run("t2v", seed=12, frames=99, is_skip_first_chunk=True)
    assert got.shape == expected.shape == (1, ref.LATENT_CHANNELS, 27, H // 8, W // 8)
    assert relative_error(got, expected) <= TOLERANCE
