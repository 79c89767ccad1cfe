"""EMA of the generator's trainable parameters (spec training.md §7.3).

The decay follows diffusers' `EMAModel` without warm-up, which the reference uses: for the k-th EMA
update, k' = k - update_after_step - 1; the decay is 0 (a plain copy) while k' <= 0, then
min(decay, (1 + k') / (10 + k')). Frozen parameters are not averaged (they never change), so only
the trainable subtree is kept here. Everything is jnp: the update runs inside the jitted step.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class EMAState(NamedTuple):
    params: object  # fp32 pytree shaped like the trainable parameters
    updates: jax.Array  # k: EMA updates done so far (int32)


def ema_init(params) -> EMAState:
    # A copy (jnp.array), never an alias of the parameters: the train step donates both.
    return EMAState(jax.tree.map(lambda p: jnp.array(p, jnp.float32), params), jnp.zeros((), jnp.int32))


def ema_decay(update: jax.Array, *, decay: float, update_after_step: int) -> jax.Array:
    """Decay of the `update`-th EMA update (1-based, as diffusers counts `optimization_step`)."""
    step = jnp.maximum(0, jnp.asarray(update) - update_after_step - 1).astype(jnp.float32)
    return jnp.where(step <= 0, 0.0, jnp.minimum((1 + step) / (10 + step), decay))


def ema_update(state: EMAState, params, *, decay: float, update_after_step: int) -> EMAState:
    """One EMA update towards `params`: ema <- ema - (1 - d_k) (ema - p)."""
    update = state.updates + 1
    one_minus = 1.0 - ema_decay(update, decay=decay, update_after_step=update_after_step)
    averaged = jax.tree.map(lambda e, p: e - one_minus * (e - jnp.asarray(p, jnp.float32)), state.params, params)
    return EMAState(averaged, update)
