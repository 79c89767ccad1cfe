"""The optimizer of every Stage 1/2 config (spec §7.1): clip the global gradient norm, then AdamW
with decoupled weight decay on every trainable parameter. The trainer hands it the trainable
subtree only, so optimizer state exists only for those parameters."""
from __future__ import annotations

import jax.numpy as jnp
import optax

SCHEDULES = ("constant", "constant_with_warmup")


def learning_rate_schedule(optimizer_config) -> optax.Schedule:
    """`constant`: lr at every step (warmup ignored, as in the reference). `constant_with_warmup`:
    lr * min(1, step / warmup_steps), counted in optimizer steps."""
    lr = float(optimizer_config.lr)
    if optimizer_config.schedule == "constant":
        return optax.constant_schedule(lr)
    if optimizer_config.schedule == "constant_with_warmup":
        warmup = int(optimizer_config.warmup_steps)
        if warmup <= 0:
            return optax.constant_schedule(lr)
        return lambda step: lr * jnp.minimum(1.0, jnp.asarray(step, jnp.float32) / warmup)
    raise ValueError(f"config.optimizer.schedule must be one of {', '.join(SCHEDULES)}; "
                     f"got {optimizer_config.schedule!r}")


def make_optimizer(optimizer_config) -> optax.GradientTransformation:
    """clip_by_global_norm(clip_norm) then adamw(schedule, b1, b2, eps, weight_decay); a clip_norm
    of 0 or less means no clipping."""
    schedule = learning_rate_schedule(optimizer_config)
    adamw = optax.adamw(schedule, b1=float(optimizer_config.b1), b2=float(optimizer_config.b2),
                        eps=float(optimizer_config.eps), weight_decay=float(optimizer_config.weight_decay))
    if float(optimizer_config.clip_norm) <= 0:
        return adamw
    return optax.chain(optax.clip_by_global_norm(float(optimizer_config.clip_norm)), adamw)
