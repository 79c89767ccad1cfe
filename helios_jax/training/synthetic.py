"""A stand-in task for the trainer until the Stage 1/2 losses and the latent loader are wired in:
a flow-matching loss on the target chunk without history, and a grain pipeline over a small fixed
set of random batches in the loader's format (spec §3.1). Real grain, so its iterator state is
checkpointed exactly like the real loader's; the loss is a real objective the model can lower.
"""
from __future__ import annotations

import grain
import jax
import jax.numpy as jnp
import numpy as np

HISTORY_FRAMES, TARGET_FRAMES = 19, 9


def chunk_velocity_loss(model, batch, key):
    """Flow-matching velocity MSE on `target_latents`: x_t = (1 - s) x0 + s eps, v = eps - x0,
    s ~ U(0, 1) per sample, model timestep 1000 s; no history. Returns (loss, metrics)."""
    x0 = jnp.asarray(batch["target_latents"], jnp.float32)
    noise_key, sigma_key = jax.random.split(key)
    eps = jax.random.normal(noise_key, x0.shape, jnp.float32)
    sigma = jax.random.uniform(sigma_key, (x0.shape[0],), jnp.float32)
    s = sigma[:, None, None, None, None]
    x_t = (1 - s) * x0 + s * eps
    dtype = model.dtype
    v_hat = model(x_t.astype(dtype), sigma * 1000.0, jnp.asarray(batch["prompt_embeds"]).astype(dtype),
                  indices_hidden_states=jnp.arange(20, 20 + x0.shape[2]))
    loss = jnp.mean(jnp.square(v_hat.astype(jnp.float32) - (eps - x0)))
    return loss, {"sigma_mean": jnp.mean(sigma)}


def synthetic_samples(model_config, *, count: int = 16, latent_hw=(8, 8), text_tokens: int = 8, seed: int = 0):
    """`count` fixed samples in the loader's per-sample layout (channels = the model's in_channels).
    Targets are smooth (low-frequency) so the tiny model can fit them in a few hundred steps."""
    rng = np.random.default_rng(seed)
    channels, (h, w) = model_config.in_channels, latent_hw
    samples = []
    for _ in range(count):
        coarse = rng.standard_normal((channels, TARGET_FRAMES, 2, 2)).astype(np.float32)
        target = np.repeat(np.repeat(coarse, h // 2, axis=2), w // 2, axis=3)
        samples.append({
            "x0_latents": target[:, :1].copy(),
            "history_latents": np.zeros((channels, HISTORY_FRAMES, h, w), np.float32),
            "target_latents": target,
            "prompt_embeds": rng.standard_normal((text_tokens, model_config.text_dim)).astype(np.float32),
        })
    return samples


def synthetic_iterator(model_config, *, batch_size: int, seed: int, shard_index: int = 0, shard_count: int = 1,
                       paired: bool = False):
    """Endless shuffled batches of `synthetic_samples` (this process's shard of each global batch);
    a grain DatasetIterator with get_state / set_state. `paired`: each sample also carries the next
    sample under keys ending in `_2` (the loader's Stage-3b format)."""
    # Stage 3b crops to half size and its GAN heads stride twice more: 16x16 latents keep every map non-empty.
    samples = synthetic_samples(model_config, seed=seed, latent_hw=(16, 16) if paired else (8, 8))
    if paired:
        samples = [{**a, **{f"{k}_2": v for k, v in samples[(i + 1) % len(samples)].items()}}
                   for i, a in enumerate(samples)]
    dataset = (grain.MapDataset.source(samples)
               .shuffle(seed=seed)
               .repeat()
               [shard_index::shard_count]
               .batch(batch_size, drop_remainder=True))
    return iter(dataset.to_iter_dataset())
