"""Stage 1 (Base) loss: rectified-flow matching on one chunk with its history (spec training.md §4).

x_sigma = (1 - sigma) x0 + sigma eps, target v = eps - x0, model timestep t = 1000 sigma (float),
sigma drawn logit-normal through the 1000-entry training table; loss = fp32 MSE.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from helios_jax.training.history_augment import augment_history, history_model_inputs

NUM_TRAIN_TIMESTEPS = 1000
# FlowMatchEuler's training sigmas with shift 1: [1.000, 0.999, ..., 0.001].
SIGMA_TABLE = (np.arange(NUM_TRAIN_TIMESTEPS, 0, -1, dtype=np.float64) / NUM_TRAIN_TIMESTEPS).astype(np.float32)


def sample_flow_sigmas(key: jax.Array, batch: int) -> jax.Array:
    """One sigma per sample: u = sigmoid(N(0, 1)), sigma = SIGMA_TABLE[floor(1000 u)] (logit-normal
    weighting scheme, mean 0, std 1)."""
    u = jax.nn.sigmoid(jax.random.normal(key, (batch,), jnp.float32))
    index = jnp.clip(jnp.floor(u * NUM_TRAIN_TIMESTEPS).astype(jnp.int32), 0, NUM_TRAIN_TIMESTEPS - 1)
    return jnp.asarray(SIGMA_TABLE)[index]


def predict_velocity(model, latents: jax.Array, timestep: jax.Array, prompt_embeds: jax.Array,
                     history_inputs: dict, feature_layers: tuple[int, ...] = ()):
    """One transformer forward on a noisy chunk with its history, called as the sampler calls it;
    inputs in the model's dtype, the velocity back in fp32 (with `feature_layers`: and the blocks'
    features, see the transformer)."""
    dtype = getattr(model, "dtype", jnp.float32)
    extra = {"feature_layers": tuple(feature_layers)} if feature_layers else {}
    out = model(latents.astype(dtype), timestep, jnp.asarray(prompt_embeds).astype(dtype), **history_inputs, **extra)
    if feature_layers:
        velocity, features = out
        return velocity.astype(jnp.float32), features
    return out.astype(jnp.float32)


def mean_squared_error(prediction: jax.Array, target: jax.Array) -> jax.Array:
    """Mean over the batch of the per-sample mean of squared errors, fp32."""
    error = jnp.square(prediction.astype(jnp.float32) - target.astype(jnp.float32))
    return jnp.mean(jnp.mean(error.reshape(error.shape[0], -1), axis=1))


def prepare_history(key: jax.Array, batch: dict, config, dtype) -> tuple[dict, dict]:
    """Drop and corrupt the batch's history (config.history) and build the model's history inputs."""
    x0, history, metrics = augment_history(key, batch["x0_latents"], batch["history_latents"], config.history)
    return history_model_inputs(x0, history, dtype), metrics


def stage1_loss(model, batch: dict, key: jax.Array, config) -> tuple[jax.Array, dict]:
    """(loss, metrics) of one Stage-1 step; a pure function of (model, batch, key)."""
    k_history, k_sigma, k_noise = jax.random.split(key, 3)
    x0 = jnp.asarray(batch["target_latents"], jnp.float32)
    history_inputs, metrics = prepare_history(k_history, batch, config, getattr(model, "dtype", jnp.float32))
    sigma = sample_flow_sigmas(k_sigma, x0.shape[0])
    noise = jax.random.normal(k_noise, x0.shape, jnp.float32)
    s = sigma[:, None, None, None, None]
    noisy = (1 - s) * x0 + s * noise
    target = noise - x0
    velocity = predict_velocity(model, noisy, NUM_TRAIN_TIMESTEPS * sigma, batch["prompt_embeds"], history_inputs)
    loss = mean_squared_error(velocity, target)
    return loss, {"loss": loss, "sigma_mean": jnp.mean(sigma), **metrics}
