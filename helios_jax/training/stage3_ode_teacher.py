"""Stage 3a teacher trajectories (spec training.md §6.1, `get_ode-pairs.py`): the Mid teacher
samples a video chunk by chunk (pyramid UniPC, `teacher_steps` per stage, CFG with the negative
prompt, its own outputs as history, prefix = the first latent of chunk 0), on schedules that pass
through the student's timesteps (training/stage3_ode_schedules.py), and at each of them the state before
the teacher's step is kept, plus every stage's end state.

The sampler's own pieces do the work: the chunk plan (from the merged schedules), the chunk program
with its static `record` option, the noise draws in the pipeline's order.
"""
from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
from flax import nnx

from helios_jax import parallel
from helios_jax.sampling import schedule_tables as tables_lib
from helios_jax.sampling.chunk_plan import ChunkSpec, ChunkTables, SamplingSettings, plan_from_schedules
from helios_jax.sampling.noise import NoiseSource
from helios_jax.sampling.pyramid import block_noise_count
from helios_jax.sampling.rollout import ChunkInputs, make_chunk_program
from helios_jax.sampling.variants import SCHEDULER_CONFIGS
from helios_jax.training import stage3_ode_schedules as ode_schedules

HISTORY_SIZES = (16, 2, 1)
CHUNK_FRAMES = 9
NUM_STAGES = 3
MAX_STUDENT_STEPS = 2 * ode_schedules.STUDENT_STEPS  # the amplified first chunk


class StageTrajectory(NamedTuple):
    states: np.ndarray  # [K + 1, B, C, 9, h, w] fp32: x(t_j) before the teacher's step at t_j, then the end state
    timesteps: np.ndarray  # [K] fp32: the t_j (the teacher's schedule at the student's steps)


class TeacherPlan(NamedTuple):
    spec: ChunkSpec
    tables: ChunkTables
    student_steps: tuple[np.ndarray, ...]  # per stage: indices of the student's timesteps among the steps
    student_timesteps: tuple[np.ndarray, ...]  # per stage: the float timesteps there (the model gets trunc(t))


def stage_sizes(latent_height: int, latent_width: int, stages: int = NUM_STAGES) -> list[tuple[int, int]]:
    factor = 2 ** (stages - 1)
    if latent_height % (2 * factor) or latent_width % (2 * factor):
        raise ValueError(f"latent {latent_height}x{latent_width}: height and width must be multiples of "
                         f"{2 * factor} for the {stages}-stage pyramid")
    return [(latent_height * 2**i // factor, latent_width * 2**i // factor) for i in range(stages)]


def plan_teacher_chunk(latent_height: int, latent_width: int, *, teacher_steps: int, first_chunk: bool,
                       guided: bool) -> TeacherPlan:
    """The teacher's chunk plan: per stage the merged schedule (mu after the stage's upsample)."""
    if teacher_steps < 1:
        raise ValueError(f"--teacher-steps={teacher_steps}: must be >= 1")
    cfg = tables_lib.from_config_json(SCHEDULER_CONFIGS["mid"])
    sizes = stage_sizes(latent_height, latent_width)
    merged = [ode_schedules.teacher_stage_schedule(i, h, w, teacher_steps=teacher_steps, amplified=first_chunk)
              for i, (h, w) in enumerate(sizes)]
    settings = SamplingSettings(pyramid_steps=(teacher_steps,) * NUM_STAGES, guidance="cfg" if guided else "none",
                                history_sizes=HISTORY_SIZES, frames=CHUNK_FRAMES)
    spec, tables = plan_from_schedules(cfg, tables_lib.stage_constants(cfg), settings,
                                       [m.schedule for m in merged], sizes)
    return TeacherPlan(spec, tables, tuple(m.student_steps for m in merged),
                       tuple(m.schedule.timesteps[m.student_steps].astype(np.float32) for m in merged))


def draw_chunk_noise(source: NoiseSource, plan: TeacherPlan, batch: int, channels: int):
    """(noise [B, C, 9, h, w], block-noise draws) of one chunk, in the pipeline's order: the chunk's
    noise at full resolution, then one block-noise draw per upsample."""
    full = plan.spec.stages[-1]
    noise = source.normal((batch, channels, CHUNK_FRAMES, full.height, full.width))
    block_noise = tuple(source.normal((block_noise_count((batch, channels, CHUNK_FRAMES, s.height, s.width)), 4))
                        for s in plan.spec.stages[1:])
    return noise, block_noise


class TeacherRollout:
    """The teacher's recording roll-out at one resolution and schedule: compiled once (one program
    for chunk 0, one for the others), then called per prompt."""

    def __init__(self, transformer, *, latent_height: int, latent_width: int, teacher_steps: int = 20,
                 guidance_scale: float = 5.0):
        self.guided = guidance_scale > 1.0
        self.guidance_scale = guidance_scale
        self.dtype = transformer.dtype
        self.channels = transformer.config.in_channels
        self.size = (latent_height, latent_width)
        graphdef, self.state = nnx.split(transformer)
        self.program = make_chunk_program(graphdef, record=True)
        self.mesh = parallel.mesh_of(transformer)
        self.plans = {first: plan_teacher_chunk(latent_height, latent_width, teacher_steps=teacher_steps,
                                                first_chunk=first, guided=self.guided) for first in (True, False)}

    def chunk_inputs(self, source: NoiseSource, plan: TeacherPlan, history, anchor, prompt_embeds,
                     negative_prompt_embeds) -> ChunkInputs:
        noise, block_noise = draw_chunk_noise(source, plan, prompt_embeds.shape[0], self.channels)
        return ChunkInputs(history=history, anchor=anchor, prompt_embeds=prompt_embeds,
                           negative_prompt_embeds=negative_prompt_embeds, noise=noise, block_noise=block_noise,
                           guidance_scale=jnp.asarray(self.guidance_scale, jnp.float32))

    def __call__(self, prompt_embeds, negative_prompt_embeds, *, num_chunks: int,
                 seed: int = 42) -> list[list[StageTrajectory]]:
        """[chunk][stage] trajectories of one T2V roll-out of `num_chunks` chunks for
        `prompt_embeds` [B, L, D] (and the negative [B, L, D] when guided)."""
        if num_chunks < 1:
            raise ValueError(f"--num-chunks={num_chunks}: must be >= 1")
        prompt_embeds = jnp.asarray(prompt_embeds).astype(self.dtype)
        negative = jnp.asarray(negative_prompt_embeds).astype(self.dtype) if self.guided else None
        batch, window = prompt_embeds.shape[0], sum(HISTORY_SIZES)
        history = jnp.zeros((batch, self.channels, window, *self.size), jnp.float32)
        anchor = jnp.zeros((batch, self.channels, 1, *self.size), jnp.float32)
        source = NoiseSource(seed)
        out = []
        for k in range(num_chunks):
            plan = self.plans[k == 0]
            inputs = self.chunk_inputs(source, plan, history, anchor, prompt_embeds, negative)
            with parallel.use_mesh(self.mesh):
                latents, states = self.program(plan.spec, self.state, inputs, plan.tables)
            chunk = []
            for stage_states, steps, timesteps in zip(states, plan.student_steps, plan.student_timesteps):
                keep = np.concatenate([steps, [stage_states.shape[0] - 1]])  # the student's steps, then the end
                chunk.append(StageTrajectory(np.asarray(stage_states)[keep], timesteps))
            out.append(chunk)
            if k == 0:
                anchor = latents[:, :, :1]
            history = jnp.concatenate([history, latents], axis=2)[:, :, -window:]
        return out

