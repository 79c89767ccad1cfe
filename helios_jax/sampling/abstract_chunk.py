"""The chunk program's arguments as ShapeDtypeStructs on a mesh: what `HeliosPipeline.iter_chunks`
passes it, without any array. Compiling with these gives the program's own memory plan and cost
before anything is loaded (the automatic mesh choice, `helios-jax aot --task rollout|generate`)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from helios_jax.parallel import activation_sharding
from helios_jax.sampling.chunk_plan import HISTORY_SIZES, LATENT_FRAMES_PER_CHUNK, SamplingSettings, plan_chunk
from helios_jax.sampling.pyramid import block_noise_count
from helios_jax.sampling.rollout import ChunkInputs

__all__ = ["HISTORY_SIZES", "LATENT_FRAMES_PER_CHUNK", "chunk_arguments"]
TEXT_TOKENS = 512


def batch_sharded(shape, dtype, mesh: Mesh) -> jax.ShapeDtypeStruct:
    """The leading dimension is the batch (data parallel), the rest replicated."""
    axes = ("batch",) + (None,) * (len(shape) - 1) if shape else ()
    sharding = activation_sharding(shape, axes, mesh) if shape else NamedSharding(mesh, PartitionSpec())
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)


def replicated(shape, dtype, mesh: Mesh) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, PartitionSpec()))


def chunk_arguments(config, scheduler, settings: SamplingSettings, mesh: Mesh, *, latent_height: int,
                    latent_width: int, batch: int = 1, first_chunk: bool = False, text_tokens: int = TEXT_TOKENS):
    """(spec, inputs, tables) of one chunk of `batch` videos: `program(spec, state, inputs, tables)`."""
    spec, tables = plan_chunk(scheduler.config, scheduler.constants, settings, latent_height=latent_height,
                              latent_width=latent_width, is_first_chunk=first_chunk,
                              patch_size=tuple(config.patch_size))
    channels, f32, h, w = config.in_channels, jnp.float32, latent_height, latent_width
    text = batch_sharded((batch, text_tokens, config.text_dim), jnp.dtype(config.dtype), mesh)
    inputs = ChunkInputs(
        history=batch_sharded((batch, channels, spec.window, h, w), f32, mesh),
        anchor=batch_sharded((batch, channels, 1, h, w), f32, mesh),
        prompt_embeds=text,
        negative_prompt_embeds=text if spec.guidance != "none" else None,
        noise=batch_sharded((batch, channels, spec.frames, h, w), f32, mesh),
        block_noise=tuple(replicated((block_noise_count((batch, channels, spec.frames, s.height, s.width)), 4), f32, mesh)
                          for s in spec.stages[1:]),
        guidance_scale=replicated((), f32, mesh),
    )
    return spec, inputs, tables
