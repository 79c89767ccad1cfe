"""`--model tiny-random`: every pipeline component at toy size with random weights, built in memory,
so `helios-jax generate` and `make demo` run anywhere without a checkpoint."""
from __future__ import annotations

from flax import nnx

from helios_jax.models import text_encoder_config, transformer_config, vae_config
from helios_jax.models.text_encoder import UMT5EncoderModel
from helios_jax.models.transformer import HeliosTransformer3DModel
from helios_jax.models.vae import AutoencoderKLWan
from helios_jax.sampling.schedulers import HeliosScheduler
from helios_jax.sampling.variants import SCHEDULER_CONFIGS


def tiny_random_builders() -> dict:
    """The tiny components' constructors, for abstract planning (sampling/placement.py)."""
    return dict(
        build_transformer=lambda: HeliosTransformer3DModel(transformer_config.preset("tiny-random"), rngs=nnx.Rngs(0)),
        build_vae=lambda: AutoencoderKLWan(vae_config.preset("tiny"), rngs=nnx.Rngs(0)),
        build_text_encoder=lambda: UMT5EncoderModel(text_encoder_config.preset("tiny"), rngs=nnx.Rngs(0)),
    )


def tiny_random_components(variant: str, *, seed: int = 0) -> dict:
    """transformer, vae, scheduler and text_encoder for HeliosPipeline(**components, **flags)."""
    from helios_jax.text.prompt_embeddings import TextEncoder
    from helios_jax.text.tiny_tokenizer import tiny_tokenizer

    text = text_encoder_config.preset("tiny")
    config = transformer_config.preset("tiny-random")
    assert config.text_dim == text.d_model, "the tiny-random preset must take the tiny UMT5's embeddings"
    transformer = HeliosTransformer3DModel(config, rngs=nnx.Rngs(seed))
    vae = AutoencoderKLWan(vae_config.preset("tiny"), rngs=nnx.Rngs(seed + 1))
    encoder = UMT5EncoderModel(text, rngs=nnx.Rngs(seed + 2))
    return dict(
        transformer=transformer,
        vae=vae,
        scheduler=HeliosScheduler.from_config_json(SCHEDULER_CONFIGS[variant]),
        text_encoder=TextEncoder(encoder, tiny_tokenizer(vocab_size=text.vocab_size)),
    )
