"""Stage 3a loss: ODE regression of the student onto the teacher's trajectories (spec training.md §6.1).

Per step, `config.distill.ode_sections` of the record's N chunks are chosen uniformly without
replacement (processed in order). For each chosen chunk and each pyramid stage (teacher-forced:
stages are independent) one of the chunk's stored student timesteps t_j is drawn uniformly, the
student sees the teacher's state x(t_j) at the stage's resolution, and its x0 estimate
x - sigma(t_j) v_hat is pulled towards the teacher's stage end state. The context of chunk k is the
teacher's final outputs (stage-2 end states) of the chunks before it, as the sampler would build it
(last 19 frames, zeros before the video start; prefix = first latent of chunk 0, zeros for chunk 0).
No history drop or corruption in this sub-stage. Every draw comes from `key`.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from helios_jax.training import stage3_distill_schedules as distill_schedules
from helios_jax.training.stage3_distill_schedules import to_x0
from helios_jax.training.stage1_flow_matching import mean_squared_error, predict_velocity
from helios_jax.training.history_augment import history_model_inputs
from helios_jax.training.stage3_ode_data import END
from helios_jax.training.stage3_ode_teacher import NUM_STAGES

HISTORY_FRAMES = 19


def teacher_context(finals: jax.Array, chunk: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(prefix [B, C, 1, H, W], history [B, C, 19, H, W]) of chunk `chunk` (traced) from the
    teacher's final chunks `finals` [B, N, C, 9, H, W]."""
    b, n, c, f, h, w = finals.shape
    video = jnp.moveaxis(finals, 1, 2).reshape(b, c, n * f, h, w)
    padded = jnp.concatenate([jnp.zeros((b, c, HISTORY_FRAMES, h, w), video.dtype), video], axis=2)
    history = jax.lax.dynamic_slice_in_dim(padded, chunk * f, HISTORY_FRAMES, axis=2)
    prefix = jnp.where(chunk > 0, video[:, :, :1], jnp.zeros_like(video[:, :, :1]))
    return prefix, history


def select_chunks(key: jax.Array, num_chunks: int, sections: int) -> jax.Array:
    """`sections` distinct chunk indices, uniformly without replacement, ascending."""
    if not 1 <= sections <= num_chunks:
        raise ValueError(f"config.distill.ode_sections={sections}: must be between 1 and the {num_chunks} "
                         "chunks of each ODE record")
    return jnp.sort(jax.random.permutation(key, num_chunks)[:sections])


def chunk_history_inputs(model, batch: dict, chunk: jax.Array) -> dict:
    """The transformer's history inputs for chunk `chunk`: the teacher's context (no drop, no corruption)."""
    finals = jnp.asarray(batch[f"stage{NUM_STAGES - 1}_states"], jnp.float32)[:, :, END]
    prefix, history = teacher_context(finals, chunk)
    return history_model_inputs(prefix, history, getattr(model, "dtype", jnp.float32))


def stage_term(model, batch: dict, stage: int, chunk: jax.Array, step: jax.Array, history_inputs: dict) -> jax.Array:
    """0.5 * mean((x0_hat - x_end)^2) of pyramid stage `stage` of chunk `chunk` at its stored student
    step `step` [B]: x0_hat = x(t_j) - sigma(t_j) v_hat, sigma from the shifted stage table."""
    states = jnp.asarray(batch[f"stage{stage}_states"], jnp.float32)
    rows = jnp.arange(states.shape[0])
    chunk_states = states[rows, chunk]  # [B, K + 1, C, 9, h, w]
    x, x_end = chunk_states[rows, step], chunk_states[:, END]
    t = jnp.asarray(batch[f"stage{stage}_timesteps"], jnp.float32)[rows, chunk, step]
    velocity = predict_velocity(model, x, t, batch["prompt_embeds"], history_inputs)
    x0 = to_x0(velocity, x, t, distill_schedules.stage_sigma_table(stage, *states.shape[-2:]))
    return 0.5 * mean_squared_error(x0, x_end)


def ode_terms(model, batch: dict, chunks: jax.Array, step_keys: jax.Array) -> jax.Array:
    """[len(chunks), stages] per-term losses; `step_keys` [len(chunks), stages] draw each term's
    student step uniformly among the chunk's stored ones (4 for chunk 0, 2 otherwise). The chunks
    run in a lax.scan: one traced copy of the stages' forwards, however many chunks are chosen."""
    num_steps = jnp.asarray(batch["num_steps"], jnp.int32)

    def chunk_terms(_, inputs):
        chunk, keys = inputs
        history_inputs = chunk_history_inputs(model, batch, chunk)
        steps = num_steps[:, chunk]
        row = []
        for i in range(NUM_STAGES):
            u = jax.random.uniform(keys[i], steps.shape)
            step = jnp.clip(jnp.floor(u * steps).astype(jnp.int32), 0, steps - 1)
            row.append(stage_term(model, batch, i, chunk, step, history_inputs))
        return None, jnp.stack(row)

    _, terms = jax.lax.scan(chunk_terms, None, (chunks, step_keys))
    return terms


def ode_loss(model, batch: dict, key: jax.Array, config) -> tuple[jax.Array, dict]:
    """(loss, metrics) of one Stage-3a step; a pure function of (model, batch, key)."""
    k_chunks, k_steps = jax.random.split(key)
    num_chunks = batch["stage0_states"].shape[1]
    sections = int(config.distill.ode_sections)
    chunks = select_chunks(k_chunks, num_chunks, sections)
    step_keys = jax.random.split(k_steps, (sections, NUM_STAGES))
    terms = ode_terms(model, batch, chunks, step_keys)
    loss = float(config.distill.ode_loss_weight) * jnp.mean(terms)
    return loss, {"loss": loss, **{f"ode_stage{i}": jnp.mean(terms[:, i]) for i in range(NUM_STAGES)}}


def ode_distance(model, batch: dict) -> float:
    """Deterministic distance of the student to the teacher on a record batch: the mean over every
    chunk, stage and stored student step of the per-term loss (tests, evaluation)."""
    num_steps = jax.device_get(batch["num_steps"])
    graphdef, state = nnx.split(model)
    terms = []
    for k in range(num_steps.shape[1]):
        for j in range(int(num_steps[:, k].min())):
            terms.append(_terms_at(graphdef, state, batch, jnp.asarray(k), jnp.asarray(j)))
    return float(jnp.mean(jnp.stack(terms)))


@functools.partial(jax.jit, static_argnums=0)
def _terms_at(graphdef, state, batch: dict, chunk: jax.Array, step: jax.Array) -> jax.Array:
    """The stage terms of chunk `chunk` at stored step `step` (traced: one compile for all of them)."""
    model = nnx.merge(graphdef, state)
    history_inputs = chunk_history_inputs(model, batch, chunk)
    steps = jnp.full((batch["num_steps"].shape[0],), step, jnp.int32)
    return jnp.stack([stage_term(model, batch, i, chunk, steps, history_inputs) for i in range(NUM_STAGES)])


def ode_step_cost(model_config, batch: dict, sections: int):
    """Tokens and training FLOPs of one Stage-3a step: per row, `sections` chunks x one forward per
    pyramid stage, each with the full-resolution history."""
    from helios_jax.models.example_inputs import token_counts
    from helios_jax.models.flops import transformer_flops
    from helios_jax.training.trainer import StepCost

    rows = batch["stage0_states"].shape[0] * jax.process_count()
    text = batch["prompt_embeds"].shape[1]
    full = tuple(batch[f"stage{NUM_STAGES - 1}_states"].shape[-3:])
    tokens, flops = 0, 0.0
    for i in range(NUM_STAGES):
        stage = tuple(batch[f"stage{i}_states"].shape[-3:])
        history, current = token_counts(model_config, full, history=True, current_size=stage)
        tokens += history + current
        flops += transformer_flops(model_config, history, current, text)
    return StepCost(rows * sections * tokens, 3.0 * rows * sections * flops)
