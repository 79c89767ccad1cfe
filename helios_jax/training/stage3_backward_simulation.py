"""The generator's roll-out in Stage 3b ("backward simulation", spec training.md §6.2.3; the
reference's `inference_with_trajectory_stage2` with GT history and one section).

One 9-frame chunk through the 2-2-2 pyramid: full-resolution noise halved twice is the stage-0
start point; each later stage starts from the previous stage's x0 upsampled and re-noised with
block noise. In stage i an exit index e_i is drawn in [0, n_i); steps before it run without
gradient (x0 = x - sigma v, then re-noised towards the stage's own start point), the exit step runs
with gradient and its x0 is the stage's output. Where the whole batch has no history (T2V-dropped,
or chunk 0) the first-chunk amplification applies: 4 steps per stage instead of 2.

As in the reference, the non-exit steps' re-noising happens under no-grad, so a stage's input
carries gradient (through its start point, i.e. the previous exits) only when it exits at step 0.
Schedules are the student's (training-side mu, stage3_distill_schedules.student_schedule); sigmas for
x0 and re-noising are looked up at the nearest timestep of the stage's shifted 1000-point table.
The exit indices are drawn once per batch (the reference syncs them across ranks), so every data
shard runs the same number of forwards; non-exit steps are a lax.fori_loop of dynamic length.
"""
from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from helios_jax.sampling.pyramid import block_noise, block_noise_count, block_noise_factor, downsample_noise, \
    renoise_coefficients, upsample_nearest
from helios_jax.sampling import schedule_tables
from helios_jax.training.stage3_distill_schedules import (distilled_scheduler, sigma_at, stage_sigma_table,
                                                          student_schedule)

Predict = Callable[[jax.Array, jax.Array], jax.Array]  # (x [B,C,T,h,w], timesteps [B]) -> velocity


class StageRollout(NamedTuple):
    """Host tables of one pyramid stage, the normal and the amplified schedule padded to one length."""

    timesteps: np.ndarray  # (2, steps_max): row 0 normal, row 1 amplified (padding repeats the last)
    num_steps: np.ndarray  # (2,) n normal, n amplified
    table: tuple[np.ndarray, np.ndarray]  # the stage's shifted (timesteps, sigmas) lookup table
    renoise: tuple[float, float]  # alpha, beta entering the stage (1, 0 for stage 0)


@functools.lru_cache(maxsize=None)
def rollout_tables(height: int, width: int, steps: tuple[int, ...] = (2, 2, 2)) -> tuple[StageRollout, ...]:
    """Per stage, for a full-resolution latent of height x width."""
    cfg = distilled_scheduler()
    constants = schedule_tables.stage_constants(cfg)
    stages = len(steps)
    out = []
    for i, n in enumerate(steps):
        h, w = height >> (stages - 1 - i), width >> (stages - 1 - i)
        normal = student_schedule(i, h, w, steps=n).timesteps
        amplified = student_schedule(i, h, w, steps=n, amplified=True).timesteps
        size = max(len(normal), len(amplified))
        pad = lambda t: np.concatenate([t, np.full(size - len(t), t[-1])])  # noqa: E731
        renoise = renoise_coefficients(constants.ori_start_sigmas[i], cfg.gamma) if i else (1.0, 0.0)
        out.append(StageRollout(np.stack([pad(normal), pad(amplified)]), np.array([len(normal), len(amplified)]),
                                stage_sigma_table(i, h, w), renoise))
    return tuple(out)


def history_is_empty(history_inputs: dict) -> jax.Array:
    """True where the whole batch's history (prefix included) is zero: the first-chunk case."""
    names = ("latents_history_short", "latents_history_mid", "latents_history_long")
    return jnp.all(jnp.stack([jnp.all(history_inputs[n] == 0) for n in names]))


def _per_sample(value, x):
    return jnp.reshape(value, value.shape + (1,) * (x.ndim - value.ndim))


def generator_rollout(predict: Predict, predict_no_grad: Predict, noise: jax.Array, key: jax.Array, *,
                      amplified: jax.Array, steps: tuple[int, ...] = (2, 2, 2)) -> tuple[jax.Array, jax.Array]:
    """x0 of one chunk [B, C, T, H, W] fp32 from full-resolution `noise`, and the exit indices (stages,).

    `predict` is the generator's forward with gradient, `predict_no_grad` the same forward on
    stop-gradient parameters (the non-exit steps). `amplified` (bool scalar): use the amplified
    schedule. The per-stage exit indices are drawn from `key`."""
    batch, _, _, height, width = noise.shape
    stages = rollout_tables(height, width, tuple(steps))
    factor = jnp.asarray(block_noise_factor(distilled_scheduler().gamma))
    exit_keys = jax.random.split(key, 2 * len(stages))
    row = amplified.astype(jnp.int32)
    start = downsample_noise(noise, len(stages) - 1)
    x0, exits = None, []
    for i, stage in enumerate(stages):
        if i:
            up = upsample_nearest(x0)
            z = jax.random.normal(exit_keys[2 * i + 1], (block_noise_count(up.shape), 4), jnp.float32)
            alpha, beta = stage.renoise
            start = alpha * up + beta * block_noise(z, up.shape, factor)
        timesteps = jnp.asarray(stage.timesteps, jnp.float32)[row]
        n = jnp.asarray(stage.num_steps)[row]
        exit_index = jax.random.randint(exit_keys[2 * i], (), 0, n)
        exits.append(exit_index)
        t_of = lambda j: jnp.full((batch,), timesteps[j])  # noqa: E731
        sigma_of = lambda j: _per_sample(sigma_at(t_of(j), stage.table), start)  # noqa: E731
        fixed_start = jax.lax.stop_gradient(start)

        def no_grad_step(j, x):
            x0_j = x - sigma_of(j) * predict_no_grad(x, t_of(j))
            s_next = sigma_of(j + 1)
            return (1 - s_next) * x0_j + s_next * fixed_start

        simulated = jax.lax.fori_loop(0, exit_index, no_grad_step, fixed_start)
        # Exit at step 0: the stage input is the start point itself, with its gradient.
        x = jnp.where(exit_index == 0, start, simulated)
        x0 = x - sigma_of(exit_index) * predict(x, t_of(exit_index))
    return x0, jnp.stack(exits)
