"""Random transformer inputs shaped as the Helios pipeline builds them (spec §2.1).

History: short = 2 frames, mid = 2, long = 16, at the current chunk's latent H x W; fixed relative
frame indices (prefix 0, long 1..16, mid 17-18, most recent 19, current 20..). Text: `text_len`
tokens of which the first `real_text_len` are non-zero (the pipeline zero-pads to 512).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

# Frame indices of each history term, the same for every chunk (spec §2.1).
HISTORY_INDICES = {"long": tuple(range(1, 17)), "mid": (17, 18), "short": (0, 19)}


def example_inputs(config, latent_size=(9, 48, 80), *, batch=1, history=True, text_len=512,
                   real_text_len=64, seed=0, current_size=None) -> dict:
    """Keyword arguments for `HeliosTransformer3DModel.__call__`. `current_size` (T, H, W) lets the
    current chunk be smaller than the history, as in pyramid stages; it defaults to `latent_size`."""
    _, height, width = latent_size  # the history is always 16 + 2 + 2 frames at this H x W
    current = tuple(current_size or latent_size)
    keys = iter(jax.random.split(jax.random.key(seed), 8))
    dtype = jnp.dtype(config.dtype)
    channels = config.in_channels

    def normal(*shape):
        return jax.random.normal(next(keys), shape, jnp.float32).astype(dtype)

    text = normal(batch, text_len, config.text_dim)
    text = text.at[:, real_text_len:].set(0)
    inputs = dict(
        hidden_states=normal(batch, channels, *current),
        timestep=jnp.full((batch,), 500.0, jnp.float32),
        encoder_hidden_states=text,
        indices_hidden_states=jnp.arange(20, 20 + current[0]),
    )
    if history:
        for name, indices in HISTORY_INDICES.items():
            inputs[f"latents_history_{name}"] = normal(batch, channels, len(indices), height, width)
            inputs[f"indices_latents_history_{name}"] = jnp.array(indices)
    return inputs


def token_counts(config, latent_size=(9, 48, 80), *, history=True, current_size=None) -> tuple[int, int]:
    """(history tokens, current tokens) of `example_inputs` with these sizes (spec §4.1)."""
    _, height, width = latent_size
    t, h, w = current_size or latent_size
    pt, ph, pw = config.patch_size
    current = (t // pt) * (h // ph) * (w // pw)
    if not history:
        return 0, current
    ceil = lambda a, b: -(-a // b)
    frames = {name: len(indices) for name, indices in HISTORY_INDICES.items()}
    short = frames["short"] * (height // ph) * (width // pw)
    mid = ceil(frames["mid"], 2 * pt) * ceil(height, 2 * ph) * ceil(width, 2 * pw)
    long = ceil(frames["long"], 4 * pt) * ceil(height, 4 * ph) * ceil(width, 4 * pw)
    return short + mid + long, current
