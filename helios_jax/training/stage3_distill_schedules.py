"""Stage-3 timestep tables: the student's pyramid schedule as trained, and the score models' tables.

Training computes the dynamic-shift mu from the latent of the *current* pyramid stage after its
upsample (spec training.md §3.4); the diffusers-version sampler computes it before. So the
student's timesteps here are the sampler's `make_schedule` with the training-side mu: the values
of the spec §6.1 table (the reference's hard-coded lists). The teacher's merged schedule in
prepare-ode passes within 0.25 of them: the reference merges each student timestep with the sigma
of the nearest grid point, before the shift (training/stage3_ode_schedules.py).

Score models (teacher, critic) see full-resolution chunks; their noise table is one linearly
shifted grid (spec §6.2.2). The v -> x0 conversions look the sigma up at the nearest grid
timestep, as the reference does.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from helios_jax.sampling import schedule_tables as tables
from helios_jax.sampling.variants import SCHEDULER_CONFIGS

LATENT_FRAMES = 9
SCORE_T_MIN, SCORE_T_MAX = 20, 980  # score timesteps are clamped to this range


def distilled_scheduler():
    return tables.from_config_json(SCHEDULER_CONFIGS["distilled"])


def training_mu(height: int, width: int, frames: int = LATENT_FRAMES) -> float:
    """Linear dynamic-shift mu for a latent of frames x height x width (tokens at patch 1x2x2)."""
    return tables.dynamic_shift_mu(frames * height * width // 4, distilled_scheduler())


def student_schedule(stage: int, height: int, width: int, *, steps: int = 2, amplified: bool = False) -> tables.Schedule:
    """The generator's schedule in pyramid stage `stage` whose latent is height x width (after the
    stage's upsample): `steps` timesteps (twice as many for the amplified first chunk) and local
    sigmas ending at 0."""
    cfg = distilled_scheduler()
    constants = tables.stage_constants(cfg)
    return tables.make_schedule(cfg, constants, steps, stage, mu=training_mu(height, width),
                                is_amplify_first_chunk=amplified)


def linear_shift(sigmas, mu: float):
    return mu * sigmas / (1 + (mu - 1) * sigmas)


def score_table(height: int = 48, width: int = 80) -> tuple[np.ndarray, np.ndarray]:
    """(timesteps, sigmas) of the score models: sigma_k = shift(linspace(1, 0.001, 1000)), t = 1000 sigma."""
    sigmas = linear_shift(np.linspace(1.0, 0.001, 1000), training_mu(height, width))
    return sigmas * 1000.0, sigmas


def sigma_at(timesteps: jax.Array, table: tuple[np.ndarray, np.ndarray]) -> jax.Array:
    """sigma of the grid timestep nearest to each of `timesteps` (any shape)."""
    grid_t, grid_sigma = (jnp.asarray(a, jnp.float32) for a in table)
    nearest = jnp.argmin(jnp.abs(jnp.asarray(timesteps, jnp.float32)[..., None] - grid_t), axis=-1)
    return grid_sigma[nearest]


def _per_sample(sigma, x):
    return jnp.reshape(sigma, sigma.shape + (1,) * (x.ndim - sigma.ndim))


def add_noise(x0, noise, timesteps, table):
    """(1 - sigma(t)) x0 + sigma(t) noise, with one timestep per sample (leading axis)."""
    sigma = _per_sample(sigma_at(timesteps, table), x0)
    return (1 - sigma) * x0 + sigma * noise


def to_x0(velocity, noisy, timesteps, table):
    """x0 = x_t - sigma(t) v (fp32; the reference uses float64, the formula is the same)."""
    sigma = _per_sample(sigma_at(timesteps, table), noisy)
    return noisy.astype(jnp.float32) - sigma * velocity.astype(jnp.float32)


def sample_score_timesteps(key, batch: int, *, step, kind: str, mu: float, a0: float = 4.0, b0: float = 1.5,
                           anneal_steps: int = 500) -> jax.Array:
    """Integer score timesteps (spec §6.2.2 `sample_dynamic_timestep`): r uniform in [0.001, 1) or
    Beta(a(s), b(s)) annealed to uniform over `anneal_steps` global steps, t = 1000 shift(r),
    clamped to [20, 980] and rounded. `kind`: "beta" (generator/DMD) or "uniform" (critic)."""
    if kind == "uniform":
        r = jax.random.uniform(key, (batch,), minval=0.001, maxval=1.0)
    elif kind == "beta":
        decay = 0.5 * (1 + jnp.cos(math.pi * jnp.minimum(jnp.asarray(step, jnp.float32) / anneal_steps, 1.0)))
        a, b = 1 + (a0 - 1) * decay, 1 + (b0 - 1) * decay
        r = jax.random.beta(key, a, b, (batch,))
    else:
        raise ValueError(f"score timestep sampler must be 'beta' or 'uniform'; got {kind!r}")
    t = 1000.0 * linear_shift(r, mu)
    return jnp.round(jnp.clip(t, SCORE_T_MIN, SCORE_T_MAX))


def stage_sigma_table(stage: int, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """(timesteps, sigmas) of pyramid stage `stage` on its 1000-point local grid, linearly shifted
    with the training-side mu of a height x width latent: the table the reference's
    convert_flow_pred_to_x0 / add_noise look sigma up in (t = t_min + sigma' (t_max - t_min))."""
    window = tables.stage_constants(distilled_scheduler()).windows[stage]
    sigmas = linear_shift(np.asarray(window.sigmas, np.float64), training_mu(height, width))
    t_min, t_max = window.timesteps.min(), window.timesteps.max()
    return t_min + sigmas * (t_max - t_min), sigmas
