"""Stage 2 (Mid) loss: pyramid flow matching, the Pyramid Unified Predictor-Corrector
(spec training.md §5.1-5.2).

Each pyramid stage i flows from a start point A_i to an end point B_i at its own resolution:
  clean pyramid X_2 = X, X_{i-1} = 2x2 mean of X_i; noise pyramid n_2 ~ N(0, I), n_{i-1} = 2 * down(n_i);
  A_0 = n_0, A_i = S_i n_i + (1 - S_i) up(X_{i-1});  B_i = E_i n_i + (1 - E_i) X_i  (B_2 = X);
  x = s A_i + (1 - s) B_i with local sigma s = 0.999 (1 - idx/1000), target v = A_i - B_i,
  model timestep = the stage's timestep table at idx.
S_i / E_i / the timestep tables are the HeliosScheduler's (shift 1, 3 stages, gamma 1/3), shared
with inference. The reference packs all samples into one NaViT forward; here each sample is its
own forward of [history | stage-i tokens], which is the same math.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from helios_jax.sampling import schedule_tables
from helios_jax.sampling.pyramid import downsample_noise, upsample_nearest
from helios_jax.training.stage1_flow_matching import mean_squared_error, predict_velocity, prepare_history

NUM_TRAIN_TIMESTEPS = 1000


class PyramidTables(NamedTuple):
    """Host constants of the pyramid scheduler, float64."""

    start_sigmas: np.ndarray  # (stages,) S_i, gamma-corrected for i > 0
    end_sigmas: np.ndarray  # (stages,) E_i
    timesteps: np.ndarray  # (stages, 1000) model timestep per local index
    local_sigmas: np.ndarray  # (1000,) 0.999 (1 - idx/1000), the same for every stage


@functools.lru_cache(maxsize=None)
def pyramid_tables() -> PyramidTables:
    """Derived once on the host from the scheduler formulas (spec §5.1)."""
    constants = schedule_tables.stage_constants(schedule_tables.SchedulerConfig())
    return PyramidTables(
        start_sigmas=np.asarray(constants.start_sigmas, np.float64),
        end_sigmas=np.asarray(constants.end_sigmas, np.float64),
        timesteps=np.stack([w.timesteps for w in constants.windows]),
        local_sigmas=np.asarray(constants.windows[0].sigmas, np.float64),
    )


def downsample_mean(x: jax.Array) -> jax.Array:
    """2x2 mean over h, w (bilinear 1/2 downsample with align_corners=False)."""
    b, c, t, h, w = x.shape
    if h % 2 or w % 2:
        raise ValueError(f"pyramid downsample needs even latent height and width; got {h}x{w}")
    return x.reshape(b, c, t, h // 2, 2, w // 2, 2).mean(axis=(4, 6))


def stage_endpoints(clean: jax.Array, noise: jax.Array, tables: PyramidTables) -> list[tuple[jax.Array, jax.Array]]:
    """(A_i, B_i) for every stage, coarsest first, from the full-resolution chunk and noise."""
    stages = len(tables.start_sigmas)
    clean_levels = [clean]
    for _ in range(stages - 1):
        clean_levels.insert(0, downsample_mean(clean_levels[0]))
    noise_levels = [downsample_noise(noise, stages - 1 - i) for i in range(stages)]
    points = []
    for i in range(stages):
        start_sigma, end_sigma = float(tables.start_sigmas[i]), float(tables.end_sigmas[i])
        n = noise_levels[i]
        start = n if i == 0 else start_sigma * n + (1 - start_sigma) * upsample_nearest(clean_levels[i - 1])
        end = clean if i == stages - 1 else end_sigma * n + (1 - end_sigma) * clean_levels[i]
        points.append((start, end))
    return points


def sample_stage_index(key: jax.Array, batch: int) -> jax.Array:
    """idx = floor(1000 u), u ~ U(0, 1) per sample (weighting scheme "none")."""
    u = jax.random.uniform(key, (batch,), jnp.float32)
    return jnp.clip(jnp.floor(u * NUM_TRAIN_TIMESTEPS).astype(jnp.int32), 0, NUM_TRAIN_TIMESTEPS - 1)


def stage2_loss(model, batch: dict, key: jax.Array, config) -> tuple[jax.Array, dict]:
    """(loss, metrics) of one Stage-2 step: sum(config.pyramid.sample_ratios) forwards, one per
    pyramid sample, all sharing the batch's (augmented) history; loss = mean of their MSEs."""
    tables = pyramid_tables()
    ratios = tuple(int(r) for r in config.pyramid.sample_ratios)
    stages = len(tables.start_sigmas)
    if len(ratios) != stages or min(ratios) < 0 or sum(ratios) == 0:
        raise ValueError(f"config.pyramid.sample_ratios must be {stages} non-negative counts, not all 0; "
                         f"got {list(ratios)}")
    k_history, k_noise, k_samples = jax.random.split(key, 3)
    clean = jnp.asarray(batch["target_latents"], jnp.float32)
    history_inputs, metrics = prepare_history(k_history, batch, config, getattr(model, "dtype", jnp.float32))
    noise = jax.random.normal(k_noise, clean.shape, jnp.float32)
    points = stage_endpoints(clean, noise, tables)
    timesteps = jnp.asarray(tables.timesteps, jnp.float32)
    local_sigmas = jnp.asarray(tables.local_sigmas, jnp.float32)

    sample_keys = iter(jax.random.split(k_samples, sum(ratios)))
    losses = []
    for stage, count in enumerate(ratios):
        start, end = points[stage]
        stage_losses = []
        for _ in range(count):
            index = sample_stage_index(next(sample_keys), clean.shape[0])
            s = local_sigmas[index][:, None, None, None, None]
            noisy = s * start + (1 - s) * end
            velocity = predict_velocity(model, noisy, timesteps[stage][index], batch["prompt_embeds"], history_inputs)
            stage_losses.append(mean_squared_error(velocity, start - end))
        if stage_losses:
            metrics[f"loss_stage{stage}"] = jnp.mean(jnp.stack(stage_losses))
        losses += stage_losses
    loss = jnp.mean(jnp.stack(losses))
    return loss, {"loss": loss, **metrics}
