"""Clip pixels and captions -> what the dataset stores (spec training.md 8.2).

Each 33-frame chunk is VAE-encoded on its own (so every chunk starts with a standalone-encoded
frame), a posterior *sample* is drawn with a key derived from (seed, clip index, chunk index), and
the result is normalized with the VAE's latents_mean / latents_std. Captions go through the
project's text encoder (cleaning, 512 tokens, zeros after the true length).
"""
from __future__ import annotations

import functools
from pathlib import Path

import jax
import numpy as np


def load_components(model: str) -> tuple:
    """(vae, text_encoder) from a Helios model folder (as HeliosPipeline.from_pretrained) or 'tiny-random'."""
    if model == "tiny-random":
        return tiny_random_components()
    from helios_jax.loading import load
    from helios_jax.text.prompt_embeddings import TextEncoder

    folder = Path(model)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such model folder")
    for part in ("vae", "text_encoder", "tokenizer"):
        if not (folder / part).is_dir():
            raise FileNotFoundError(f"{folder}: no {part}/ folder (prepare-data needs vae/, text_encoder/, tokenizer/)")
    return load(folder / "vae"), TextEncoder.from_pretrained(folder)


@functools.cache  # built once per process: tests and repeated in-process runs share the same weights
def tiny_random_components() -> tuple:
    """The VAE and text encoder of helios_jax.tiny_random (same seeds), without building its transformer."""
    from flax import nnx

    from helios_jax.models import text_encoder_config, vae_config
    from helios_jax.models.text_encoder import UMT5EncoderModel
    from helios_jax.models.vae import AutoencoderKLWan
    from helios_jax.text.prompt_embeddings import TextEncoder
    from helios_jax.text.tiny_tokenizer import tiny_tokenizer

    text = text_encoder_config.preset("tiny")
    vae = AutoencoderKLWan(vae_config.preset("tiny"), rngs=nnx.Rngs(1))
    encoder = UMT5EncoderModel(text, rngs=nnx.Rngs(2))
    return vae, TextEncoder(encoder, tiny_tokenizer(vocab_size=text.vocab_size))


def chunk_key(seed: int, clip_index: int, chunk_index: int) -> jax.Array:
    """The posterior-sample key of one chunk: reproducible per clip and chunk, whatever else is encoded."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), clip_index), chunk_index)


def encode_chunks(vae, chunks: np.ndarray, *, seed: int, clip_index: int) -> np.ndarray:
    """float32 [N, 3, 33, H, W] pixels -> normalized latent samples float32 [N, z, 9, H/8, W/8]."""
    latents = []
    for index, chunk in enumerate(chunks):
        posterior = vae.encode_posterior(jax.numpy.asarray(chunk[None]))
        sample = posterior.sample(chunk_key(seed, clip_index, index))
        latents.append(np.asarray(vae.normalize_latents(sample)[0], np.float32))
    return np.stack(latents)


def encode_caption(text_encoder, caption: str) -> np.ndarray:
    """float32 [512, text_dim]: the UMT5 last hidden state, exact zeros after the true length."""
    return np.asarray(text_encoder.encode([caption])[0], np.float32)
