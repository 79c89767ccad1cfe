"""The chunk program: one jitted, pure function that denoises one chunk through every step of
every pyramid stage (spec sampler.md §2.3, §4, §5).

Inputs are the transformer's parameters, the fixed-size history window, the anchor frame, the
text embeddings and the chunk's noise draws; the output is the chunk's clean latents. The host
only slices schedules and appends history, so a 4-chunk video runs this program four times from
one compile (plus one for an amplified first chunk, whose step counts differ).
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from helios_jax.parallel import constrain
from helios_jax.sampling import guidance as guidance_lib
from helios_jax.sampling import unipc_step as unipc
from helios_jax.sampling.chunk_plan import ChunkSpec, ChunkTables, StageTables
from helios_jax.sampling.dmd_step import dmd_step
from helios_jax.sampling.pyramid import block_noise, downsample_noise, upsample_nearest


class ChunkInputs(NamedTuple):
    history: jax.Array  # [B, C, window, h, w] fp32: the last sum(history_sizes) latent frames
    anchor: jax.Array  # [B, C, 1, h, w]: the "prefix" frame (zeros for T2V chunk 0)
    prompt_embeds: jax.Array  # [B, L, D]
    negative_prompt_embeds: jax.Array | None  # [B, L, D] with guidance, else None
    noise: jax.Array  # [B, C, frames, h, w] fp32 standard normal
    block_noise: tuple[jax.Array, ...]  # per stage transition: z [rows, 4]
    guidance_scale: jax.Array  # scalar


def rope_indices(spec: ChunkSpec) -> dict[str, np.ndarray]:
    """Constant frame indices (relative RoPE): prefix 0, long, mid, 1x, then the chunk."""
    long, mid, one = spec.history_sizes
    sections = np.split(np.arange(1 + long + mid + one + spec.frames), np.cumsum([1, long, mid, one]))
    prefix, long_i, mid_i, one_i, current = sections
    return dict(
        indices_hidden_states=current[None],
        indices_latents_history_short=np.concatenate([prefix, one_i])[None],
        indices_latents_history_mid=mid_i[None],
        indices_latents_history_long=long_i[None],
    )


def make_chunk_program(graphdef, *, record: bool = False):
    """`program(spec, state, inputs, tables) -> latents [B, C, frames, h, w]`, jitted with `spec` static.
    With `record` (static) it returns (latents, states): per stage the sample before each step and
    the stage's end state, [n + 1, B, C, frames, h_i, w_i] fp32 (the ODE-pair teacher, Stage 3a)."""

    def program(spec: ChunkSpec, state, inputs: ChunkInputs, tables: ChunkTables):
        return denoise_chunk(nnx.merge(graphdef, state), spec, inputs, tables, record=record)

    return jax.jit(program, static_argnums=0)


def denoise_chunk(model, spec: ChunkSpec, inputs: ChunkInputs, tables: ChunkTables, *, record: bool = False):
    dtype = model.dtype
    predict = _velocity_fn(model, spec, inputs)
    x = downsample_noise(inputs.noise, len(spec.stages) - 1) if spec.pyramid else inputs.noise.astype(jnp.float32)
    recorded = []
    for index, (stage, stage_tables) in enumerate(zip(spec.stages, tables.stages)):
        if index > 0:
            x = upsample_nearest(x)
            noise = block_noise(inputs.block_noise[index - 1], x.shape, jnp.asarray(tables.block_factor))
            alpha, beta = stage_tables.renoise[0], stage_tables.renoise[1]
            # Python-scalar-like weights: the result keeps x's dtype (bf16 after a DMD stage).
            x = alpha.astype(x.dtype) * x + beta.astype(x.dtype) * noise.astype(dtype)
        x, states = _run_stage(spec, stage_tables, predict, x, record)
        if spec.solver == "dmd":
            x = x.astype(dtype)  # the last DMD step returns x0 in the model output's dtype
        if record:
            recorded.append(jnp.concatenate([states, x[None]], axis=0).astype(jnp.float32))
    if record:
        return x.astype(jnp.float32), tuple(recorded)
    return x.astype(jnp.float32)


def _velocity_fn(model, spec: ChunkSpec, inputs: ChunkInputs):
    """v(x, t): one transformer forward (cond and uncond batched together) plus guidance."""
    dtype = model.dtype
    long, mid, one = spec.history_sizes
    history = inputs.history
    short = jnp.concatenate([inputs.anchor.astype(history.dtype), history[:, :, long + mid :]], axis=2)
    histories = dict(
        latents_history_short=short.astype(dtype),
        latents_history_mid=history[:, :, long : long + mid].astype(dtype),
        latents_history_long=history[:, :, :long].astype(dtype),
    )
    context = inputs.prompt_embeds
    guided = spec.guidance != "none"
    if guided:
        histories = {k: jnp.concatenate([v, v], axis=0) for k, v in histories.items()}
        context = jnp.concatenate([context, inputs.negative_prompt_embeds], axis=0)
    # On a mesh, cond and uncond are one batch of 2B split over `data` (CFG's two passes in parallel).
    batch_first = lambda a: constrain(a, ("batch",) + (None,) * (a.ndim - 1))  # noqa: E731
    histories = {k: batch_first(v) for k, v in histories.items()}
    context = batch_first(context.astype(dtype))
    indices = {k: jnp.asarray(v) for k, v in rope_indices(spec).items()}

    def predict(x, timestep, zero_init):
        hidden = x.astype(dtype)
        if guided:
            hidden = jnp.concatenate([hidden, hidden], axis=0)
        hidden = batch_first(hidden)
        t = jnp.broadcast_to(timestep, (hidden.shape[0],))
        v = model(hidden, t, context, **histories, **indices)
        cond, uncond = jnp.split(v, 2, axis=0) if guided else (v, None)
        return guidance_lib.combine(spec.guidance, cond, uncond, inputs.guidance_scale, zero_init)

    return predict


def _run_stage(spec: ChunkSpec, tables: StageTables, predict, x: jax.Array,
               record: bool = False) -> tuple[jax.Array, jax.Array | None]:
    """All steps of one stage in a lax.scan; the solver state resets per stage (set_timesteps).
    Returns (end state, the sample before each step [n, ...] with `record`, else None)."""
    emit = (lambda x: x) if record else (lambda x: None)  # noqa: E731
    steps = (jnp.arange(len(tables.model_timesteps)), jnp.asarray(tables.model_timesteps), jnp.asarray(tables.zero_init))
    if spec.solver == "dmd":
        start = x

        def dmd_body(x, step):
            i, t, zero = step
            v = predict(x, t, zero)
            return dmd_step(v, x, start, i, tables.sigmas), emit(x)

        return jax.lax.scan(dmd_body, x, steps)
    if spec.solver != "unipc":
        raise ValueError(f"unknown solver {spec.solver!r}")
    coefficients = jax.tree.map(jnp.asarray, tables.unipc)

    def unipc_body(carry, step):
        x, state = carry
        i, t, zero = step
        v = predict(x, t, zero)
        x_next, state = unipc.unipc_step(coefficients, v, x, i, state)
        return (x_next, state), emit(x)

    (x, _), states = jax.lax.scan(unipc_body, (x, unipc.init_state(x)), steps)
    return x, states
