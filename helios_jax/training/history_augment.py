"""History inputs of a training sample: random drop and Easy Anti-Drifting (spec training.md §3.1
steps 4-5, §3.3), as pure jax.random functions of static shape for the jitted train step.

Tensors are [B, C, T, h, w] fp32. The 19 history frames run oldest to newest; "absent" history is
exact zeros in its fixed slots, and every augmentation keeps zeros zero.
"""
from __future__ import annotations

import functools
import types

import jax
import jax.numpy as jnp
import numpy as np

from helios_jax.sampling.rollout import rope_indices

HISTORY_SIZES = (16, 2, 1)  # long, mid, 1x (spec §0)
CHUNK_FRAMES = 9  # latent frames per chunk: drops and corruption windows come in these units
SHORT_SPLIT = 2  # the newest window's first frames that form their own saturation group (len_mid)

# Drop modes, one per batch (metrics and tests read these codes).
DROP_NONE, DROP_T2V, DROP_I2V, DROP_V2V = 0, 1, 2, 3


def history_model_inputs(x0: jax.Array, history: jax.Array, dtype) -> dict[str, jax.Array]:
    """The transformer's history keyword arguments for prefix x0 [B, C, 1, h, w] and history
    [B, C, 19, h, w]: long 16 / mid 2 / short = [x0, newest], with the fixed relative RoPE indices
    the sampler uses (spec §1 item 2)."""
    long, mid, one = HISTORY_SIZES
    if history.shape[2] != long + mid + one:
        raise ValueError(f"history_latents must have {long + mid + one} frames; got shape {tuple(history.shape)}")
    short = jnp.concatenate([x0, history[:, :, long + mid:]], axis=2)
    indices = rope_indices(types.SimpleNamespace(history_sizes=HISTORY_SIZES, frames=CHUNK_FRAMES))
    return dict(
        latents_history_short=short.astype(dtype),
        latents_history_mid=history[:, :, long:long + mid].astype(dtype),
        latents_history_long=history[:, :, :long].astype(dtype),
        **{name: jnp.asarray(value) for name, value in indices.items()},
    )


# ------------------------------------------------------------------------------------------------
# Random drop (spec §3.1 step 5)


def random_drop(key: jax.Array, x0: jax.Array, history: jax.Array, p_t2v: float, p_i2v: float,
                p_v2v: float) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One draw for the whole batch: T2V zeros all history and the prefix; else I2V keeps only the
    prefix and the newest frame; else V2V zeros the oldest 1, 10 or 19 frames (19 mod 9 + 9k).
    Returns (x0, history, mode code)."""
    frames = history.shape[2]
    k_t2v, k_i2v, k_v2v, k_count = jax.random.split(key, 4)
    t2v = jax.random.uniform(k_t2v) < p_t2v
    i2v = ~t2v & (jax.random.uniform(k_i2v) < p_i2v)
    v2v = ~t2v & ~i2v & (jax.random.uniform(k_v2v) < p_v2v)
    v2v_count = frames % CHUNK_FRAMES + CHUNK_FRAMES * jax.random.randint(k_count, (), 0, frames // CHUNK_FRAMES + 1)
    dropped = jnp.where(t2v, frames, jnp.where(i2v, frames - 1, jnp.where(v2v, v2v_count, 0)))
    keep = (jnp.arange(frames) >= dropped).astype(history.dtype)
    history = history * keep[None, None, :, None, None]
    x0 = jnp.where(t2v, jnp.zeros_like(x0), x0)
    mode = jnp.where(t2v, DROP_T2V, jnp.where(i2v, DROP_I2V, jnp.where(v2v, DROP_V2V, DROP_NONE)))
    return x0, history, mode


# ------------------------------------------------------------------------------------------------
# Frame-aware corruption (spec §3.3)


def corruption_windows(frames: int) -> np.ndarray:
    """Window id of each frame of [prefix | history]: 0 the prefix, 1 the oldest `frames mod 9`
    frames (the tail), then one id per 9-frame window, newest-aligned."""
    tail = frames % CHUNK_FRAMES
    ids = [0] + [1] * tail + [2 + i // CHUNK_FRAMES for i in range(frames - tail)]
    return np.asarray(ids)


def _window_nonzero(x: jax.Array, window_ids: np.ndarray) -> jax.Array:
    """[B, T] bool: the frame's (sample, window) has any non-zero value."""
    frame_nonzero = jnp.any(x != 0, axis=(1, 3, 4)).astype(jnp.float32)  # [B, T]
    membership = jnp.asarray(window_ids[:, None] == np.arange(window_ids.max() + 1)[None], jnp.float32)
    window_nonzero = frame_nonzero @ membership > 0  # [B, W]
    return window_nonzero.astype(jnp.float32) @ membership.T > 0


def noise_corrupt(key: jax.Array, x: jax.Array, ratio: float) -> jax.Array:
    """x <- s * N(0, 1) + (1 - s) * x with s ~ U(0, ratio) per (sample, frame)."""
    k_s, k_n = jax.random.split(key)
    s = jax.random.uniform(k_s, (x.shape[0], 1, x.shape[2], 1, 1), x.dtype, 0.0, ratio)
    return s * jax.random.normal(k_n, x.shape, x.dtype) + (1 - s) * x


def resize_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out, in] weights of an antialiased linear (bilinear per axis) resize, half-pixel centres:
    the triangle kernel is widened by in/out when shrinking (jax.image.resize "linear",
    antialias=True; torch's antialiased bilinear). Rows sum to 1."""
    scale = out_size / in_size
    width = max(1.0, 1.0 / scale)
    centres = (np.arange(out_size) + 0.5) / scale - 0.5
    weights = np.maximum(0.0, 1.0 - np.abs(centres[:, None] - np.arange(in_size)[None]) / width)
    return weights / weights.sum(axis=1, keepdims=True)


@functools.lru_cache(maxsize=None)
def _blur_operators(size: int) -> tuple[np.ndarray, int]:
    """[n, size, size] matrices M_k = up(down(.)) for the down sizes floor(0.9 size) + k < size:
    a resize to the smaller size and back, as one linear map on one axis (host, float64)."""
    smallest = int(np.floor(0.9 * size))
    operators = [resize_matrix(small, size) @ resize_matrix(size, small) for small in range(max(smallest, 1), size)]
    if not operators:  # size 1: nothing smaller to resize to
        operators.append(np.eye(size))
    return np.stack(operators).astype(np.float32), max(smallest, 1)


def downsample_corrupt(key: jax.Array, x: jax.Array, window_ids: np.ndarray) -> jax.Array:
    """Per (sample, window): resize every frame by u ~ U(0.9, 1) and back (a blur). The released
    code crashes here (spec §11.2); this is the intended per-frame spatial down/up resize."""
    b, _, t, h, w = x.shape
    u = jax.random.uniform(key, (b, int(window_ids.max()) + 1), jnp.float32, 0.9, 1.0)[:, window_ids]  # [B, T]
    blurred = x
    for axis, size in ((3, h), (4, w)):
        operators, smallest = _blur_operators(size)
        index = jnp.clip(jnp.floor(u * size).astype(jnp.int32) - smallest, 0, len(operators) - 1)
        matrix = jnp.asarray(operators)[index]  # [B, T, size, size]
        equation = "btij,bctjw->bctiw" if axis == 3 else "btij,bcthj->bcthi"
        blurred = jnp.einsum(equation, matrix, blurred)
    return blurred


def corrupt_history(key: jax.Array, x0: jax.Array, history: jax.Array, *, mode: str, clean_prob: float,
                    noise_ratio: float) -> jax.Array:
    """Frame-aware corruption of [prefix | history]; returns (x0, history).

    With prob `clean_prob` (one draw per call) nothing changes. Otherwise mode "noise", or "random"
    (noise w.p. 0.9 else downsample, one draw per call). Windows that are entirely zero for a sample
    are left untouched, so absent history stays exactly zero.
    """
    if mode not in ("noise", "random"):
        raise ValueError(f"history corrupt_mode must be 'noise' or 'random'; got {mode!r}")
    k_clean, k_mode, k_noise, k_down = jax.random.split(key, 4)
    x = jnp.concatenate([x0, history], axis=2)
    window_ids = corruption_windows(history.shape[2])
    corrupted = noise_corrupt(k_noise, x, noise_ratio)
    if mode == "random":
        use_downsample = jax.random.uniform(k_mode) >= 0.9
        corrupted = jnp.where(use_downsample, downsample_corrupt(k_down, x, window_ids), corrupted)
    active = _window_nonzero(x, window_ids) & (jax.random.uniform(k_clean) >= clean_prob)  # [B, T]
    x = jnp.where(active[:, None, :, None, None], corrupted, x)
    return x[:, :, :1], x[:, :, 1:]


def saturation_groups(frames: int) -> np.ndarray:
    """Group id of each history frame: the tail, each 9-frame window, and the newest window split
    into its first 2 frames and the rest (spec §3.3)."""
    ids = corruption_windows(frames)[1:] - 1
    newest = ids == ids.max()
    first_of_newest = np.flatnonzero(newest)[:SHORT_SPLIT]
    ids = ids.copy()
    ids[newest] += 1
    ids[first_of_newest] -= 1
    return ids


def saturate_history(key: jax.Array, history: jax.Array, clean_prob: float) -> jax.Array:
    """Per group, with prob 1 - clean_prob: x <- (x - m) f + m, m the channel mean at each
    position, f ~ U(0.3, 0.999) or U(1.001, 1.7) w.p. 1/2 each; one factor per group shared by
    the batch. Zero frames have m = 0 and stay zero."""
    groups = saturation_groups(history.shape[2])
    count = int(groups.max()) + 1
    k_clean, k_side, k_low, k_high = jax.random.split(key, 4)
    apply = jax.random.uniform(k_clean, (count,)) >= clean_prob
    factor = jnp.where(jax.random.uniform(k_side, (count,)) < 0.5,
                       jax.random.uniform(k_low, (count,), minval=0.3, maxval=0.999),
                       jax.random.uniform(k_high, (count,), minval=1.001, maxval=1.7))
    factor = jnp.where(apply, factor, 1.0)[groups][None, None, :, None, None]
    mean = jnp.mean(history, axis=1, keepdims=True)
    return (history - mean) * factor + mean


# ------------------------------------------------------------------------------------------------
# All of it, per the training config


def augment_history(key: jax.Array, x0: jax.Array, history: jax.Array, config) -> tuple[jax.Array, jax.Array, dict]:
    """Drop, corruption and saturation as `config` (config.history) says. Returns (x0, history,
    metrics) with metrics["drop_mode"] the batch's drop code."""
    k_drop, k_corrupt, k_saturate = jax.random.split(key, 3)
    x0 = jnp.asarray(x0, jnp.float32)
    history = jnp.asarray(history, jnp.float32)
    x0, history, mode = random_drop(k_drop, x0, history, config.drop_t2v, config.drop_i2v, config.drop_v2v)
    if config.corrupt:
        x0, history = corrupt_history(k_corrupt, x0, history, mode=config.corrupt_mode,
                                      clean_prob=config.clean_prob, noise_ratio=config.noise_ratio)
    if config.saturation:
        history = saturate_history(k_saturate, history, config.saturation_clean_prob)
    return x0, history, {"drop_mode": mode}
