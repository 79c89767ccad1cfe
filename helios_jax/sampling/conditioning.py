"""Conditioning latents from an image (I2V) or a video (V2V), made as diffusers' Helios pipeline
makes them: each VAE encode is an independent causal segment whose posterior is *sampled*, then
normalised with the checkpoint's latent statistics.

`draw(shape)` supplies the standard-normal noise of every posterior sample, in the pipeline's
order (spec vae_and_text.md A.7), so a test or the pipeline's noise source can replay a reference run.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

Draw = Callable[[tuple[int, ...]], jax.Array]


def encode_sample(vae, video: jax.Array, draw: Draw) -> jax.Array:
    """Video [B, 3, T, H, W] -> normalised latents sampled from the posterior."""
    posterior = vae.encode_posterior(video)
    return vae.normalize_latents(posterior.sample(noise=jnp.asarray(draw(posterior.mean.shape))))


def chunk_frames(vae, latent_frames_per_chunk: int) -> int:
    """Pixel frames of one chunk: 33 for 9 latents at the Wan2.1 temporal stride of 4."""
    return (latent_frames_per_chunk - 1) * vae.config.scale_factor_temporal + 1


def image_condition(vae, image: jax.Array, draw: Draw, *, latent_frames_per_chunk: int = 9):
    """I2V: image [B, 3, H, W] in [-1, 1] -> (image_latents, fake_image_latents), each [B, z, 1, h, w].

    The second is the last latent of the image repeated over one chunk's frames: what a chunk
    whose frames all show the image ends in. All its latents are drawn, as in the reference.
    """
    if image.ndim != 4:
        raise ValueError(f"image must be [B, 3, H, W]; got shape {tuple(image.shape)}")
    still = image[:, :, None]
    image_latents = encode_sample(vae, still, draw)
    repeated = jnp.repeat(still, chunk_frames(vae, latent_frames_per_chunk), axis=2)
    fake_image_latents = encode_sample(vae, repeated, draw)[:, :, -1:]
    return image_latents, fake_image_latents


def video_condition(vae, video: jax.Array, draw: Draw, *, latent_frames_per_chunk: int = 9):
    """V2V: video [B, 3, F, H, W] in [-1, 1] -> (first_frame_latents [B, z, 1, h, w], video_latents).

    The video is cut into whole chunks of 33 frames aligned to its end (the earliest F mod 33
    frames are dropped), each encoded separately; its frame 0 is encoded alone as well.
    """
    if video.ndim != 5:
        raise ValueError(f"video must be [B, 3, F, H, W]; got shape {tuple(video.shape)}")
    frames = chunk_frames(vae, latent_frames_per_chunk)
    num_chunks = video.shape[2] // frames
    if num_chunks == 0:
        raise ValueError(f"video must have at least {frames} frames for {latent_frames_per_chunk} latents per chunk; "
                         f"got {video.shape[2]}")
    start = video.shape[2] - num_chunks * frames
    first_frame_latents = encode_sample(vae, video[:, :, :1], draw)
    chunks = [encode_sample(vae, video[:, :, s : s + frames], draw) for s in range(start, video.shape[2], frames)]
    return first_frame_latents, jnp.concatenate(chunks, axis=2)
